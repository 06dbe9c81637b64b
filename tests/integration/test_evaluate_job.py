"""The evaluate job end to end: a checkpoint on S3, Ray tasks over shards, results in MLflow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from rn50.io.checkpoints import download
from rn50.serve.artifacts import load_model
from rn50.serve.evaluate import (build_parser, build_val_dataset, evaluate_shard, metrics,
                                 run_from_args)
from tests.model_helpers import digits_config, write_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _upload_dir(s3_server, local: Path, prefix: str) -> str:
    client = s3_server.client()
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_server.bucket, f"{prefix}/{path.relative_to(local)}")
    return f"s3://{s3_server.bucket}/{prefix}"


def test_ray_workers_evaluate_an_s3_checkpoint_and_log_to_mlflow(tmp_path, s3_env,
                                                                 mlflow_server, monkeypatch):
    config = digits_config(tmp_path / "digits")
    local = write_checkpoint(tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000", config)
    run_uri = _upload_dir(s3_env, tmp_path / "run", "eval-runs/run1")
    monkeypatch.setenv("RN50_CACHE", str(tmp_path / "cache"))
    cached = download(run_uri)  # the run dir on S3 resolves to its checkpoint
    assert (cached / "state.pt").read_bytes() == (local / "state.pt").read_bytes()
    expected = metrics(evaluate_shard(load_model(str(local)).model,
                                      build_val_dataset(config.data)))

    env = {**os.environ, **s3_env.env(), "RN50_CACHE": str(tmp_path / "cache2"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "ray_jobs/evaluate.py", "--checkpoint", run_uri, "--workers", "2",
         "--tracking-uri", mlflow_server.tracking_uri, "--experiment", "eval-it",
         "--gallery-size", "8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    result = json.loads(next(line[len("RESULT "):] for line in done.stdout.splitlines()
                             if line.startswith("RESULT ")))
    assert result["workers"] == 2 and result["images"] == 96
    assert result["top1"] == pytest.approx(expected["top1"])
    assert result["top5"] == pytest.approx(expected["top5"])
    assert s3_env.secret_key not in output

    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["eval/top5"] == pytest.approx(expected["top5"])
    assert run.data.params["checkpoint"] == run_uri
    gallery = client.download_artifacts(run.info.run_id, "misclassified.png", str(tmp_path))
    assert Image.open(gallery).format == "PNG"


def test_an_mlflow_model_uri_is_evaluated_with_its_runs_recipe(tmp_path, mlflow_server):
    config = digits_config(tmp_path / "digits")
    loaded = load_model(str(write_checkpoint(tmp_path / "checkpoint_0", config, seed=5)))
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    # An experiment id, not mlflow.set_experiment: that would stay the active experiment of this
    # pytest process and make MLflow refuse later tests' runs of other experiments.
    experiment_id = MlflowClient(mlflow_server.tracking_uri).create_experiment("trained-elsewhere")
    example = torch.zeros(1, 3, 32, 32)
    with mlflow.start_run(experiment_id=experiment_id) as run:  # what training logs: recipe + model
        mlflow.log_text(config.to_yaml(), "recipe.yaml")
        with torch.no_grad():
            signature = mlflow.models.infer_signature(example.numpy(),
                                                      loaded.model(example).numpy())
        # MLflow 3 stores a torch.export program fixed to this batch of 1; evaluation must
        # still batch it (and Grad-CAM must still hook it).
        mlflow.pytorch.log_model(loaded.model, name="model", signature=signature,
                                 input_example=example.numpy(),
                                 pip_requirements=["torch==2.14.1", "torchvision==0.29.1"])
    args = build_parser().parse_args([
        "--checkpoint", f"runs:/{run.info.run_id}/model", "--tta-flip",
        "--tracking-uri", mlflow_server.tracking_uri, "--gallery-size", "4"])
    summary = run_from_args(args)
    flipped = metrics(evaluate_shard(loaded.model, build_val_dataset(config.data),
                                     tta_flip=True))
    assert summary["weights"] == "mlflow" and summary["tta_flip"] is True
    assert summary["top1"] == pytest.approx(flipped["top1"])
    eval_run = MlflowClient(mlflow_server.tracking_uri).get_run(summary["mlflow_run_id"])
    assert eval_run.data.tags["rn50.evaluated_run_id"] == run.info.run_id
    served = load_model(f"runs:/{run.info.run_id}/model",
                        tracking_uri=mlflow_server.tracking_uri)
    assert served.arch == "resnet50"
    assert served.classifier.class_names == [str(d) for d in range(10)]
    with torch.no_grad():
        batch = torch.randn(3, 3, 32, 32)
        assert torch.allclose(served.model(batch), loaded.model(batch), atol=1e-5)
