"""A node type without a price, on the fake multi-node cluster: the job is refused before anything
trains (~1 minute). The budget's two stops, its carry-over across starts and the cost's bounds
are in test_head_records.py (on the real S3 and MLflow servers); the price table's budget on the
rehearsal's GPU node types in test_first_run.py."""
import json
import shutil
import subprocess
import uuid

import pytest
from mlflow import MlflowClient

from tests.integration.fake_cluster import RAY, REPO, FakeCluster
from tests.integration.jobs import small

pytestmark = pytest.mark.integration


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
    # Every type the cluster config defines is priced before anything starts, the head's too.
    refusal = next((line for line in output.splitlines() if "no price for node type(s) [" in line),
                   "")
    assert "'ray.head.default'" in refusal and "'gpu.a100x8.spot'" in refusal, output[-4000:]
    assert "cost.usd_per_hour" in output
    client = MlflowClient(tracking_uri)  # no run opened in any experiment of the head's store
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments), "an MLflow run was opened for an unpriced job"
