"""The main job end to end, as a user runs it: a subprocess, real Ray, real S3, real MLflow."""
import json
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from rn50.config import load_config
from tests.integration.jobs import run_job, small

pytestmark = pytest.mark.integration


def test_demo_recipe_learns_on_s3_and_lands_in_mlflow(tmp_path, s3_server, mlflow_server):
    env = {**s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    code, output, result = run_job(
        ["--recipe", "demo", "--name", "demo-s3", "--storage", f"s3://{s3_server.bucket}/runs",
         f"data.root={tmp_path / 'digits'}"], env)
    assert code == 0, output[-4000:]
    assert result["val_top1"] >= 90.0, result
    assert result["epochs"] == 8 and result["checkpoint"].startswith(f"s3://{s3_server.bucket}/runs/demo-s3/")

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="runs/demo-s3/")
            .get("Contents", [])]
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.endswith("/state.pt") for k in keys)

    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["scaling.num_workers"] == "2"
    for tag in ("git_commit", "ray_version", "torch_version", "num_workers", "device"):
        assert run.data.tags.get(tag), tag
    history = client.get_metric_history(run.info.run_id, "val/top1")
    assert sorted(m.step for m in history) == list(range(8))
    for metric in ("train/loss", "val/top5", "lr", "images_per_s"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 8, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "training_curves.png", "misclassified.png"} <= artifacts, artifacts
    recipe = Path(client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path)))
    assert load_config(str(recipe)).optim.lr == 0.05  # the logged recipe trains again unchanged
    model_uri = f"runs:/{run.info.run_id}/model"
    import mlflow.pytorch
    import torch
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    model = mlflow.pytorch.load_model(model_uri)
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)  # any batch size
    everything = json.dumps({**run.data.params, **run.data.tags}) + output
    assert s3_server.secret_key not in everything


def test_worker_failure_resumes_and_rerun_continues_the_same_mlflow_run(tmp_path):
    storage, tracking = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["--name", "faulty", "--storage", str(storage), f"tracking.uri={tracking}",
            *small(tmp_path, epochs=3)]
    code, output, result = run_job(
        [*base, "faults.raise_at_epoch=2", f"faults.marker_path={tmp_path / 'fault.marker'}"])
    assert code == 0, output[-4000:]
    assert "injected fault at the start of epoch 2" in output
    assert "resumed from" in output and "(epoch 1, 8 steps done)" in output
    assert result["epochs"] == 3
    client = MlflowClient(tracking)
    assert sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "val/top1")) \
        == [0, 1, 2]

    code, output, again = run_job([*base[:-len(small(tmp_path))], *small(tmp_path, epochs=4)])
    assert code == 0, output[-4000:]
    assert again["mlflow_run_id"] == result["mlflow_run_id"] and again["epochs"] == 4
    assert "(epoch 2, 8 steps done)" in output
    steps = sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "val/top1"))
    assert steps == [0, 1, 2, 3]
    experiment = client.get_experiment_by_name("rn50-demo")
    assert len(client.search_runs([experiment.experiment_id])) == 1


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("train.epochs=ten", "'train.epochs' expects int"),
])
def test_config_mistakes_fail_before_ray_starts(override, fragment):
    code, output, result = run_job([override], timeout=120)
    assert code == 2 and fragment in output and result is None
    assert "Started a local Ray instance" not in output


def test_wrong_s3_key_fails_fast_with_a_clear_message(tmp_path, s3_server):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "definitely-wrong-secret"}
    code, output, _ = run_job(["--storage", f"s3://{s3_server.bucket}/runs",
                               f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"], env, timeout=180)
    assert code == 3 and "AWS_SECRET_ACCESS_KEY" in output
    assert "definitely-wrong-secret" not in output
