"""The AWS workflow rehearsed on one machine: cluster.local.yaml's autoscaler adds fake GPU nodes
for `ray job submit ... train_full.py`. One node gets a spot interruption notice from its (fake)
metadata service: its spot watcher drains it, the run checkpoints at once, the node is killed at
the action time, and the run completes from that checkpoint on a node the autoscaler launched to
replace it, ending on the weights of the same run never interrupted (the session's `reference`),
bit for bit, each epoch logged once. The run trains the reference's maths from the start: a
notice's 20 s to the action time is most of a run that starts later, from a copy of the
reference's checkpoint as the elastic and chaos runs do (from the end of epoch 1, a run at 0.4 s
a step ended before its node was taken).
(A node lost without any notice is, to Ray Train, a worker group failure: `test_faults.py` kills a
training worker by pid.)
"""
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rn50.io import checkpoints as ckpt
from tests.fake_imds import NOTICE, FakeImds
from tests.integration.fake_cluster import RAY, REPO, FakeCluster, kill_tree
from tests.integration.faults import fingerprint
from tests.integration.jobs import REFERENCE_EPOCHS, epochs_logged, reference_maths, result_line

pytestmark = pytest.mark.integration

GPU_TYPE = "gpu.a100x8.spot"  # what the autoscaler should pick for accelerator_type=A100
START_EPOCH = 0  # the run trains all 5 of the reference's epochs


@pytest.fixture
def fake_cluster(tmp_path):
    # Set on `ray start` only, as cluster.yaml does: it must reach the job's driver from there.
    with FakeCluster(head_env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}) \
            as cluster:
        yield cluster


def _submit(cluster, tmp_path, name, digits, extra=()):
    """`ray job submit` exactly as docs/aws.md has it, in the background: the reference's run."""
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
               "--submission-id", f"{name}-{uuid.uuid4().hex[:6]}",
               "--entrypoint-resources", json.dumps({"head_driver": 1}), "--",
               "python", "ray_jobs/train_full.py", "--recipe", "rehearsal", "--name", name,
               "--storage", str(tmp_path / "runs"), *reference_maths(digits), *extra]
    log = open(tmp_path / "job.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log,
                            stderr=subprocess.STDOUT, text=True), log


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


class StepLog:
    """Tails the job's log, noting when each training step's line arrived (rank 0 logs every
    step with train.log_every_steps=1): how far training was when something happened."""

    def __init__(self, path, steps_per_epoch: int):
        self.path, self.steps_per_epoch = path, steps_per_epoch
        self.seen: list[tuple[float, int]] = []  # (arrival, global steps done)
        self._offset = 0

    def poll(self) -> None:
        with open(self.path, errors="replace") as log:
            log.seek(self._offset)
            text = log.read()
        cut = text.rfind("\n") + 1  # a partly written line is read again next time
        self._offset += len(text[:cut].encode(errors="replace"))
        now = time.time()
        for epoch, step in re.findall(r"\[rn50 rank0\] epoch (\d+) step (\d+) ", text[:cut]):
            self.seen.append((now, int(epoch) * self.steps_per_epoch + int(step) + 1))

    def done_at(self, moment: float) -> int:
        """Global steps done according to the lines that had arrived by `moment`."""
        return max((steps for arrival, steps in self.seen if arrival <= moment), default=0)


def _start_watcher(cluster, imds, log_path):
    """The command cluster.yaml's worker start commands run, pointed at a fake IMDS."""
    env = {**cluster.env, "RN50_IMDS_URL": imds.url}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "rn50.distributed.spot_watcher",
                                 "--address", cluster.gcs_address, "--poll-s", "1"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _preemption_checkpoint(run_dir):
    """(folder, summary) of the first preemption checkpoint that verifies, else None."""
    for manifest in sorted(run_dir.glob("checkpoint_2*/manifest.json")):
        try:
            summary = ckpt.verify(str(manifest.parent), hashes=False)["summary"]
        except Exception:  # noqa: BLE001 - not complete yet
            continue
        if summary.get("reason") == "preemption":
            return manifest.parent, summary
    return None


def test_spot_notice_drains_the_node_the_run_checkpoints_and_moves_on(reference, fake_cluster,
                                                                      tmp_path):
    """The rehearsal of a spot interruption on autoscaled nodes: notice, drain, checkpoint, the
    node taken at the action time, a replacement launched, the run resumed and completed on the
    uninterrupted run's weights (the world size does not change: a bit-exact resume)."""
    # 20 s from the notice to the action time: the run is still training when it comes.
    name, deadline_s, check_every = "noticed", 20, 2
    digits, _, straight = reference
    job, log = _submit(fake_cluster, tmp_path, name, digits, extra=[
        "train.log_every_steps=1", "checkpoint.every_steps=0",
        # Epoch ends checkpoint as the recipe says: a run that went on after the notice resumes
        # from its newest epoch, so no epoch is trained, and logged, twice.
        f"checkpoint.preemption_check_every_steps={check_every}",
        "checkpoint.preemption_poll_s=1", "checkpoint.keep_last=10",
        "checkpoint.max_failures=0"])  # a preemption must not use up max_failures
    steps, watchers, servers = StepLog(tmp_path / "job.log", 512 // 32), [], []
    first_step = START_EPOCH * steps.steps_per_epoch
    run_dir, seen = tmp_path / "runs" / name, set()
    try:
        # The head has CPU 0 and no GPU: the two workers can only run on autoscaled nodes. Once
        # they train, Ray knows both nodes, and a watcher finds its node at its start.
        def two_nodes_training():
            steps.poll()
            raylets = fake_cluster.worker_raylets()
            training = steps.done_at(time.time()) > first_step
            return raylets if len(raylets) >= 2 and training else None
        raylets = _wait(two_nodes_training, job, 300, "2 worker nodes and training", tmp_path)
        assert {fake_cluster.node_type(r) for r in raylets.values()} == {GPU_TYPE}
        seen.update(raylets)
        for node_id, pid in sorted(raylets.items()):  # an IMDS and a watcher per node, as on EC2
            servers.append(FakeImds(instance_id=fake_cluster.instance_id(pid)).start())
            watchers.append(_start_watcher(fake_cluster, servers[-1],
                                           tmp_path / f"watcher-{node_id[-5:]}.log"))
        victim_id, victim = sorted(raylets.items())[0]

        def watched_and_training():
            steps.poll()
            return steps.done_at(time.time()) >= first_step + 4 and all(
                "watching" in p.read_text() for p in tmp_path.glob("watcher-*.log"))
        _wait(watched_and_training, job, 300, "training, and the watchers on their nodes",
              tmp_path)
        action_at = servers[0].post_notice(in_s=deadline_s)

        def checkpointed():
            steps.poll()
            return _preemption_checkpoint(run_dir)
        folder, summary = _wait(checkpointed, job, deadline_s, "the notice's checkpoint", tmp_path)
        checkpoint_at = time.time()
        time.sleep(max(0.0, action_at - time.time()))
        kill_tree(victim)  # the action time: EC2 takes the node

        def finished():
            seen.update(fake_cluster.worker_raylets())
            return job.poll() is not None
        _wait(finished, job, 400, "the job to finish", tmp_path)
    finally:
        for process in watchers:
            process.kill()
        for server in servers:
            server.stop()
        if job.poll() is None:
            job.kill()
        job.wait(timeout=30)
        log.close()
    output = (tmp_path / "job.log").read_text(errors="replace")
    assert job.returncode == 0, output[-4000:]
    notice_at = servers[0].notice_served_at
    delay_s = checkpoint_at - notice_at
    at_notice = steps.done_at(notice_at)
    in_checkpoint = summary["epoch"] * steps.steps_per_epoch + summary["steps_done"]
    print(f"notice -> verified checkpoint {delay_s:.1f} s; steps done at the notice >= "
          f"{at_notice}, in the checkpoint {in_checkpoint}")
    assert delay_s < deadline_s, "the checkpoint must be in storage before the node goes"
    # Every step completed before the notice is in the checkpoint.
    assert in_checkpoint >= at_notice > first_step and in_checkpoint % check_every == 0
    # The run resumes from the notice's checkpoint, or from a newer one when training went on
    # (an epoch ended) between the notice and the action time: nothing before the notice is lost.
    resumed = re.findall(r"resumed from (\S+) \(epoch (\d+), (\d+) steps done", output)
    assert resumed, output[-4000:]
    resumed_from, resumed_epoch, resumed_steps = resumed[0]
    assert Path(resumed_from).name >= folder.name, (resumed, folder.name)
    assert int(resumed_epoch) * steps.steps_per_epoch + int(resumed_steps) >= in_checkpoint
    result = result_line(output)
    assert result["epochs"] == REFERENCE_EPOCHS
    # Nothing lost, nothing counted twice: the uninterrupted run's weights, each epoch once.
    assert fingerprint(result["checkpoint"]) == straight
    assert epochs_logged(result) == list(range(START_EPOCH, REFERENCE_EPOCHS))
    assert ckpt.verify(resumed_from, hashes=False)["summary"]["epoch"] == int(resumed_epoch)
    drained = [p.read_text() for p in sorted(tmp_path.glob("watcher-*.log"))]
    victim_log = (tmp_path / f"watcher-{victim_id[-5:]}.log").read_text()
    assert f"drained Ray node {victim_id}" in victim_log, victim_log
    assert sum("drained Ray node" in text for text in drained) == 1, "only the noticed node"
    assert set(servers[1].statuses(NOTICE)) == {404}
    assert victim_id not in fake_cluster.worker_raylets(), "the taken node came back?"
    assert len(seen - {victim_id}) >= 2, f"no replacement node was launched (saw {seen})"
    # MLFLOW_TRACKING_URI given only to `ray start --head` reached the driver, as on AWS.
    assert result["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    _record(delay_s, at_notice, in_checkpoint, deadline_s, check_every)


def _record(delay_s, at_notice, in_checkpoint, deadline_s, check_every) -> None:
    """benchmarks/results/spot_notice.json, when RN50_RECORD_RESULTS=1."""
    if os.environ.get("RN50_RECORD_RESULTS") != "1":
        return
    from benchmarks.results import write_result
    write_result("spot_notice", {
        "notice_to_verified_checkpoint_s": round(delay_s, 1),
        "steps_done_at_notice_at_least": at_notice, "steps_in_checkpoint": in_checkpoint,
        "drain_deadline_s": deadline_s, "preemption_check_every_steps": check_every,
        "watcher_poll_s": 1, "preemption_poll_s": 1, "environment": "RN50_RECORD_RESULTS=1",
        "setup": "2 fake A100 nodes (1 CPU each) on the 2-core machine, local storage"},
        argv=["-m", "pytest", "tests/integration/test_local_cluster.py", "-k", "spot_notice"])
