"""A spot preemption notice followed by the loss of the node, on a two-node local cluster.

The S3 outage has its own test (`test_faults_s3.py`), and a failed Train controller (what a failed
write of its snapshot to storage raises) the driver's restart test in `test_faults.py`."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rn50.config import load_config
from tests.integration.faults import common


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


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
    from rn50.distributed.driver import run_training
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
