"""`ray job submit --working-dir . -- python ray_jobs/train_full.py` against `ray start --head`."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.jobs import REPO, small

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` (token authentication left on, as Ray 2.60 ships it)."""
    # Ray 2.60's `ray start --head` turns token auth on and writes ~/.ray/auth_token; the job CLI
    # only sends that token when RAY_AUTH_MODE=token is set (it does not fall back on its own).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", f"--port={_free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    "--disable-usage-stats"], env=env, check=True, timeout=180,
                   capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, ray_bin
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, timeout=120, capture_output=True)


def test_ray_job_submit_runs_the_main_job(tmp_path, ray_head):
    address, env, ray_bin = ray_head
    command = [ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "ray_jobs/train_full.py", "--name", "submitted",
               "--storage", str(tmp_path / "runs"), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
               *small(tmp_path, epochs=1)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(next(line for line in output.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["epochs"] == 1 and result["name"] == "submitted"
    assert Path(result["checkpoint"], "manifest.json").is_file()
