"""Faults that need more than one process group: the S3 server going down during checkpoint
uploads, and a spot preemption notice followed by the loss of the node."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rn50.config import load_config
from tests.integration.jobs import REPO
from tests.integration.test_faults import common


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_s3_outage_during_uploads_is_ridden_out(tmp_path, s3_server):
    prefix = "faults-s3"
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen(
        [sys.executable, "ray_jobs/train_full.py", "--name", "outage", "--storage",
         f"s3://{s3_server.bucket}/{prefix}", *common(tmp_path, epochs=4), "checkpoint.every_steps=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = s3_server.client()

    def manifests() -> int:
        listing = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/outage/")
        return sum(o["Key"].endswith("manifest.json") for o in listing.get("Contents", []))
    _wait_for(lambda: manifests() >= 1 or job.poll() is not None, 600, "the first checkpoint")
    s3_server.stop()  # a crash, mid-run: uploads in flight are cut
    time.sleep(10)
    s3_server.start()
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-5000:]
    # The outage was hit: an upload retried, or the Train controller restarted from storage.
    assert "retrying in" in output or "waiting for storage, then resuming" in output
    result = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[7:])
    assert result["epochs"] == 4
    listing = subprocess.run([sys.executable, "-m", "rn50.checkpoint", "ls",
                              f"s3://{s3_server.bucket}/{prefix}/outage"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0 and "verified=yes" in listing.stdout, listing.stdout


@pytest.fixture
def two_node_cluster():
    """A head that only drives (0 CPUs) and one 2-CPU worker node, in this process's Ray."""
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_preemption_notice_checkpoints_then_the_run_moves_to_a_new_node(tmp_path, two_node_cluster):
    from rn50.train import run_training
    cluster, doomed = two_node_cluster
    config = load_config("demo", [*common(tmp_path, epochs=4), "checkpoint.every_steps=0",
                                  "checkpoint.preemption_check_every_steps=1"])
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=run_training(config, "preempted", str(tmp_path / "runs"))), daemon=True)
    runner.start()
    run_dir = tmp_path / "runs" / "preempted"

    def summaries() -> list[dict]:
        return [json.loads(p.read_text())["summary"] for p in run_dir.glob("checkpoint_2*/manifest.json")]
    _wait_for(lambda: summaries() or not runner.is_alive(), 600, "the first checkpoint")
    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address",
                    cluster.address, "--node-id", doomed.node_id, "--reason",
                    "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                    "--deadline-remaining-seconds", "120"], check=True, timeout=60)
    # Seen while it exists: keep_last prunes the mid-epoch checkpoint once later epochs finish.
    _wait_for(lambda: any(s.get("reason") == "preemption" for s in summaries()), 300,
              "the preemption checkpoint")
    cluster.add_node(num_cpus=2)  # the replacement spot node
    cluster.remove_node(doomed)   # the reclaim itself
    runner.join(timeout=900)
    assert outcome.get("result", {}).get("epochs") == 4, outcome
