"""The MLflow export served by `mlflow models serve`, queried over HTTP like any client would."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from rn50.serve import inference
from rn50.serve.artifacts import load_model
from rn50.serve.export import export
from tools.local_servers import free_ports, log_tail
from tests.model_helpers import digits_config, write_checkpoint

pytestmark = pytest.mark.integration


def _wait_for_ping(url: str, process: subprocess.Popen, log, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve not up in {timeout_s:.0f} s:\n{log_tail(log)}")


def test_mlflow_models_serve_answers_with_the_models_top5(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "checkpoint_0", digits_config(tmp_path / "digits"))
    loaded = load_model(str(checkpoint))
    (model_dir,) = export(loaded, "mlflow", tmp_path / "exports")
    (port,) = free_ports(1)
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(url, process, log)
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(3))
        request = urllib.request.Request(f"{url}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    with torch.no_grad():
        probs = loaded.model(inference.normalize(images)).softmax(dim=1)
    top = probs.topk(5, dim=1)
    for row, values, indices in zip(predictions, top.values.tolist(), top.indices.tolist()):
        assert row["class_index"] == indices[0] and row["label"] == str(indices[0])
        assert row["top5_labels"] == [str(i) for i in indices]
        assert row["top5_probabilities"] == pytest.approx(values, rel=1e-4)
