"""Cost and budget rehearsed locally: a real local Ray priced at a made-up $3,600/h (a dollar a
second), a $1 budget that the first epoch already uses up, then the same command with a higher
budget continuing the run to its end. Two training jobs (~2 minutes on 2 cores). And on the
fake multi-node cluster, a price table missing one of its node types (no training, ~1.5 min)."""
import json
import shutil
import subprocess
import uuid

import pytest
from mlflow import MlflowClient

from rn50.core import checkpoint as ckpt
from tests.integration.fake_cluster import RAY, REPO, FakeCluster
from tests.integration.jobs import run_job, small

pytestmark = pytest.mark.integration
EPOCHS = 2


def _args(tmp_path, budget_usd):
    return ["--recipe", "demo", "--name", "budget", "--storage", str(tmp_path / "runs"),
            *small(tmp_path, epochs=EPOCHS), f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
            "cost.local_usd_per_hour=3600", "cost.log_every_s=2",
            f"train.budget_usd={budget_usd}"]


def test_a_budget_stops_the_run_resumably_and_a_higher_one_finishes_it(tmp_path):
    # Job 1. Red if the budget is not checked at epoch ends (the run completes), the stop loses
    # its checkpoint, or the driver calls a stopped run finished.
    code, output, first = run_job(_args(tmp_path, 1))
    assert code == 5 and first is not None, output[-4000:]
    assert first["stopped"] == "budget" and first["epochs"] == 1, first
    assert first["cost_usd"] > 1, first  # ~$1 a second since the driver started
    assert "stopping after epoch 0 with a checkpoint" in output
    assert "rerun with a higher train.budget_usd" in output
    checkpoint = ckpt.verify(first["checkpoint"], hashes=False)
    assert checkpoint["summary"]["epoch"] == 0
    client = MlflowClient(first["tracking_uri"])
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["rn50.stopped_by"] == "budget"
    assert float(run.data.tags["rn50.budget_usd"]) == 1
    history = sorted(client.get_metric_history(run.info.run_id, "cost/usd"), key=lambda m: m.step)
    assert len(history) >= 3, history  # every cost.log_every_s, and once at the end
    assert [m.value for m in history] == sorted(m.value for m in history)
    assert history[-1].value == pytest.approx(first["cost_usd"], abs=1e-3)

    # Job 2: a budget below what the run already cost. Red if it trains (or starts Ray) anyway,
    # or touches the stopped run.
    code, output, refused = run_job(_args(tmp_path, 2), timeout=180)
    assert code == 2 and refused is None, output[-4000:]
    assert "train.budget_usd=2 but run 'budget' has already cost $" in output
    assert "Started a local Ray instance" not in output
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    # Job 3. Red if the rerun starts over (epoch 0 logged twice) or does not finish.
    code, output, last = run_job(_args(tmp_path, 100_000))
    assert code == 0 and last is not None, output[-4000:]
    assert last["epochs"] == EPOCHS and "stopped" not in last, last
    assert "resumed from" in output and "(epoch 0," in output
    assert last["mlflow_run_id"] == run.info.run_id and last["cost_usd"] > first["cost_usd"]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "rn50.stopped_by" not in run.data.tags
    epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert epochs == list(range(EPOCHS)), epochs
    history = sorted(client.get_metric_history(run.info.run_id, "cost/usd"), key=lambda m: m.step)
    assert [m.value for m in history] == sorted(m.value for m in history)  # it carried on
    assert history[-1].value == pytest.approx(last["cost_usd"], abs=1e-3)


def test_a_node_type_missing_from_the_price_table_stops_the_job_before_it_starts(tmp_path):
    # On the fake cluster (cluster.local.yaml's node types, as the autoscaler labels them): the
    # head is `ray.head.default`, which a recipe's own table (no built-in one) lacks. Red if the
    # type is not read from the node's labels, or the job trains (or opens an MLflow run) on a
    # guessed price.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cluster = FakeCluster(head_env={"MLFLOW_TRACKING_URI": tracking_uri})
    cluster.start()
    try:
        proc = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
             "--submission-id", f"unpriced-{uuid.uuid4().hex[:6]}",
             "--entrypoint-resources", json.dumps({"head_driver": 1}), "--",
             "python", "ray_jobs/train_full.py", "--recipe", "demo", "--name", "unpriced",
             "--storage", str(tmp_path / "runs"), *small(tmp_path, epochs=1),
             "cost.price_table=none", "cost.usd_per_hour={gpu.a10g.spot: 0.5}"],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "RESULT" not in output, output[-4000:]
    assert "no price for node type(s) ['ray.head.default']" in output, output[-4000:]
    assert "cost.usd_per_hour" in output
    client = MlflowClient(tracking_uri)  # no run opened in any experiment of the head's store
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments), "an MLflow run was opened for an unpriced job"
