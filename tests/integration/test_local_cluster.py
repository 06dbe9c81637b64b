"""The AWS workflow rehearsed on one machine: cluster.local.yaml's autoscaler adds fake GPU nodes
for `ray job submit ... train_full.py`, one node is killed mid-run (a spot preemption), and the
job still completes from its latest checkpoint on a replacement node.
"""
import json
import shutil
import subprocess
import time
import uuid

import pytest

from tests.integration.fake_cluster import RAY, REPO, FakeCluster, kill_tree
from tests.integration.jobs import small

pytestmark = pytest.mark.integration

EPOCHS = 5
GPU_TYPE = "gpu.a100x8.spot"  # what the autoscaler should pick for accelerator_type=A100


@pytest.fixture
def fake_cluster(tmp_path):
    # Set on `ray start` only, as cluster.yaml does: it must reach the job's driver from there.
    cluster = FakeCluster(head_env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _submit(cluster, tmp_path, name):
    """`ray job submit` exactly as docs/aws.md has it, in the background."""
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
               "--submission-id", f"{name}-{uuid.uuid4().hex[:6]}",
               "--entrypoint-resources", json.dumps({"head_driver": 1}), "--",
               "python", "ray_jobs/train_full.py", "--recipe", "demo", "--name", name,
               "--storage", str(tmp_path / "runs"), *small(tmp_path, epochs=EPOCHS),
               "scaling.use_gpu=true", "scaling.accelerator_type=A100"]
    log = open(tmp_path / "job.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log,
                            stderr=subprocess.STDOUT, text=True), log


def _registered_checkpoint(run_dir):
    """Whether Ray's controller has recorded a checkpoint (not merely started writing one)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def _wait(condition, job, timeout_s, what, tmp_path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job.poll() is not None:
            break
        time.sleep(0.5)
    tail = (tmp_path / "job.log").read_text(errors="replace")[-4000:]
    pytest.fail(f"timed out or job ended ({job.poll()}) waiting for {what}; job log:\n{tail}")


def test_autoscaled_job_survives_losing_a_worker_node(fake_cluster, tmp_path):
    name = "rehearsal"
    job, log = _submit(fake_cluster, tmp_path, name)
    seen = set()

    def checkpoint_and_nodes():
        raylets = fake_cluster.worker_raylets()
        seen.update(raylets)
        return raylets if _registered_checkpoint(tmp_path / "runs" / name) and \
            len(raylets) >= 2 else None

    try:
        # The head has CPU 0 and no GPU: the two workers can only run on autoscaled nodes.
        raylets = _wait(checkpoint_and_nodes, job, 300,
                        "2 worker nodes and a registered checkpoint", tmp_path)
        assert {fake_cluster.node_type(r) for r in raylets.values()} == {GPU_TYPE}
        victim_id, victim = sorted(raylets.items())[0]
        kill_tree(victim)  # the node vanishes with its raylet and training worker

        def replaced():
            seen.update(fake_cluster.worker_raylets())
            return job.poll() is not None
        _wait(replaced, job, 300, "the job to finish after the node loss", tmp_path)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait(timeout=30)
        log.close()
    output = (tmp_path / "job.log").read_text(errors="replace")
    assert job.returncode == 0, output[-4000:]
    result = json.loads(next(line for line in output.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["epochs"] == EPOCHS and result["name"] == name
    assert "resumed from" in output, "the run should restart from its checkpoint"
    assert victim_id not in fake_cluster.worker_raylets(), "the killed node came back?"
    assert len(seen - {victim_id}) >= 2, f"no replacement node was launched (saw {seen})"
    # MLFLOW_TRACKING_URI given only to `ray start --head` reached the driver, as on AWS.
    assert result["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
