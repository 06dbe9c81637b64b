"""`ray job submit --working-dir . -- python ray_jobs/train_full.py` against `ray start --head`:
with the recipe, storage and tracking the head's environment names (as cluster.yaml sets them),
and, with no storage and tracking, refused before it writes into the job's working directory
(which Ray deletes)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rn50.io import mlflow_backup
from tests.integration.jobs import REPO, small

pytestmark = pytest.mark.integration
HEAD_EXPERIMENT = "rn50-head-recipe"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(module_tmp, s3_server):
    """A real `ray start --head` (token authentication left on, as Ray 2.60 ships it), its
    environment naming the recipe, storage and tracking store jobs default to; yields (dashboard
    address, environment, ray CLI, that folder, the MLflow backup)."""
    tmp_path = module_tmp
    # As cluster.yaml's head start: restore the MLflow database (none yet), then start Ray with
    # the backup status file named, so every job backs the database up when it ends.
    db, backup = tmp_path / "mlflow.db", f"s3://{s3_server.bucket}/head-backup/mlflow.db"
    subprocess.run([sys.executable, "-m", "rn50.mlflow_backup", "restore", "--db", str(db),
                    "--backup", backup], cwd=REPO, env={**os.environ, **s3_server.env()},
                   check=True, timeout=120, capture_output=True)
    # Ray 2.60's `ray start --head` turns token auth on and writes ~/.ray/auth_token; the job CLI
    # only sends that token when RAY_AUTH_MODE=token is set (it does not fall back on its own).
    # The head's recipe (cluster.yaml names a built-in one): the demo in an experiment of its
    # own, so that a job that ran the local default instead is told apart.
    recipe = tmp_path / "head_recipe.yaml"
    recipe.write_text(f"base: demo\ntracking:\n  experiment: {HEAD_EXPERIMENT}\n")
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token",
           "RN50_RECIPE": str(recipe),  # as cluster.yaml's head start sets, like the two below
           "RN50_STORAGE": str(tmp_path / "durable-runs"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
           "RN50_MLFLOW_BACKUP_STATUS": str(mlflow_backup.status_path(db))}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", f"--port={_free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    "--disable-usage-stats"], env=env, check=True, timeout=180,
                   capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, ray_bin, tmp_path, backup
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, timeout=120, capture_output=True)


def test_ray_job_submit_runs_the_main_job_into_the_heads_storage_and_backs_up_mlflow(ray_head):
    address, env, ray_bin, tmp_path, backup = ray_head
    command = [ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "ray_jobs/train_full.py", "--name", "submitted",
               *small(tmp_path, epochs=1)]  # no --recipe, --storage, tracking.uri: the head's
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # The job's log opens with what it chose and why. Red if a bare job ignores RN50_RECIPE (it
    # would train the local demo) or chooses without saying so.
    log = proc.stdout.split("Running entrypoint for job ", 1)[1].splitlines()[1:]  # Ray's, then
    lines = [line for line in log if line.strip()]                                 # the job's
    head_set = "in the environment, which cluster.yaml sets on the head"
    assert lines[:3] == [
        f"[rn50] recipe: {env['RN50_RECIPE']} (from $RN50_RECIPE {head_set}; --recipe overrides "
        "it)",
        f"[rn50] storage: {env['RN50_STORAGE']} (from $RN50_STORAGE {head_set}; --storage "
        "overrides it)",
        f"[rn50] tracking: {env['MLFLOW_TRACKING_URI']} (from $MLFLOW_TRACKING_URI {head_set})"
    ], "\n".join(lines[:10])
    assert "Connected to Ray cluster" in output  # the driver joined the head's cluster
    result = json.loads(next(line for line in output.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["epochs"] == 1 and result["name"] == "submitted"
    assert result["checkpoint"].startswith(str(tmp_path / "durable-runs" / "submitted"))
    assert Path(result["checkpoint"], "manifest.json").is_file()
    db = tmp_path / "mlflow.db"
    assert result["tracking_uri"] == f"sqlite:///{db}"
    assert mlflow_backup.read_status(mlflow_backup.status_path(db))["ok"] is True

    # The head is lost right after the job (`ray down`): its database goes, the backup stays.
    for path in tmp_path.glob("mlflow.db*"):
        path.unlink()
    subprocess.run([sys.executable, "-m", "rn50.mlflow_backup", "restore", "--db", str(db),
                    "--backup", backup], cwd=REPO, env=env, check=True, timeout=120,
                   capture_output=True)
    run = MlflowClient(f"sqlite:///{db}").get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED", run.info.status
    experiment = MlflowClient(f"sqlite:///{db}").get_experiment(run.info.experiment_id)
    assert experiment.name == HEAD_EXPERIMENT  # the head's recipe, not the demo's experiment
    history = MlflowClient(f"sqlite:///{db}").get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in history] == [0] and history[0].value == result["val_top1"]
    assert {"train/loss", "data_wait_fraction", "train/epoch_loss"} <= set(run.data.metrics)


def test_a_bare_job_without_durable_storage_is_refused_before_it_writes(tmp_path, ray_head):
    address, env, ray_bin, _, _ = ray_head
    # The verbatim command on a head that names no storage and no tracking server.
    unset = json.dumps({"env_vars": {"RN50_STORAGE": "", "MLFLOW_TRACKING_URI": ""}})
    command = [ray_bin, "job", "submit", "--address", address, "--working-dir", ".",
               "--runtime-env-json", unset, "--", "python", "ray_jobs/train_full.py",
               "--name", "bare", *small(tmp_path, epochs=1)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "RESULT" not in output, output[-4000:]
    assert "would write into the Ray job's working directory" in output, output[-4000:]
    assert "--storage s3://" in output and "RN50_STORAGE" in output
    assert "tracking.uri=" in output and "MLFLOW_TRACKING_URI" in output
    # Refused before the driver even joined the cluster (the run above shows the line it prints
    # when it does; "Started a local Ray instance" could never show under `ray job submit`).
    assert "Connected to Ray cluster" not in output
