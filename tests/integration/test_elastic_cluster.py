"""An elastic run (`scaling.num_workers=[1, 2]`) on a real multi-node Ray cluster (a head and one
raylet per node, on this machine, one cluster for the module):

- started while another job holds one of the two CPUs, it trains at once with one worker (sized
  from what is free, not from the cluster's totals) and grows to two when that job ends;
- a node is taken (its raylet and everything on it SIGKILLed): the run goes on with the surviving
  worker without waiting for a replacement (nor for Ray to notice the node is dead), and grows
  back to two workers when a node joins, with `world_size` over time in MLflow.

Both start from a copy of the reference's checkpoint at the end of its first epoch (START_EPOCH:
the 4 epochs left have room for the shrink and the growth where a step takes 0.4 s; the whole
run would cost the suite ~10 s more a test) and end on the weights of the same run at a fixed
two workers (the session's `reference`), bit for bit: 2 micro-batches per step on 1 worker or 2
is the same arithmetic (tests/integration/jobs.py says why). Each epoch is logged once, every
resume starts from a checkpoint that verifies, no step is lost and none is repeated beyond those
since that checkpoint.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rn50.io import checkpoints as ckpt
from tests.integration.fake_cluster import REPO, FakeCluster, kill_tree
from tests.integration.faults import fingerprint
from tests.integration.jobs import (REFERENCE_EPOCHS, epochs_logged, reference_epoch_end,
                                    reference_maths, result_line, start_from_copy)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two 1-CPU nodes."""
    with FakeCluster(autoscaling=False) as started:
        started.added = [started.add_node(), started.add_node()]  # Ray node ids
        yield started


def _start_driver(cluster, tmp_path, name, reference, *extra):
    """The reference's run as an elastic run of 1 to 2 CPU workers from the reference's checkpoint
    at the end of epoch START_EPOCH - 1, its driver on this machine joined to the cluster
    (RAY_ADDRESS); the head has no CPU for the workers."""
    digits, done, _ = reference
    start_from_copy(reference_epoch_end(done, START_EPOCH - 1), tmp_path / "runs" / name)
    command = [sys.executable, "ray_jobs/train_full.py", "--recipe", "demo", "--name", name,
               "--storage", str(tmp_path / "runs"), *reference_maths(digits),
               "scaling.num_workers=[1,2]", "scaling.resize_check_s=10",
               f"checkpoint.every_steps={EVERY_STEPS}", "train.log_every_steps=1",
               "checkpoint.keep_best_by=none", "scaling.start_timeout_s=45",
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    log = open(tmp_path / "job.log", "w")
    # Every step line (Ray would fold repeats into "[repeated Nx across cluster]").
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "RAY_DEDUP_LOGS": "0"}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                           text=True)
    job.launched = time.monotonic()
    return job, log


def _log_text(tmp_path) -> str:
    return (tmp_path / "job.log").read_text(errors="replace")


SEEN_VERIFIED: dict[str, tuple[int, int]] = {}
"""Checkpoint folder -> (epoch, steps done), for every checkpoint seen complete and verified
while its run was going (a run keeps only its newest few: the one a resume used may be gone by
the end)."""


def _note_checkpoints(tmp_path) -> None:
    for manifest in (tmp_path / "runs").glob("*/checkpoint_2*/manifest.json"):
        folder = str(manifest.parent)
        if folder not in SEEN_VERIFIED:
            try:
                summary = ckpt.verify(folder, hashes=False)["summary"]
            except Exception:  # noqa: BLE001 - still being written, or already deleted
                continue
            SEEN_VERIFIED[folder] = (summary["epoch"], summary.get("steps_done", PER_EPOCH))


def _wait_for(pattern, job, tmp_path, timeout_s, count=1, after=0):
    """The distinct matches of `pattern` in the job log past offset `after`, once there are
    `count` (every node's log monitor streams the shared session's worker logs: lines repeat)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _note_checkpoints(tmp_path)
        found = list(dict.fromkeys(re.findall(pattern, _log_text(tmp_path)[after:])))
        if len(found) >= count:
            return found
        if job.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"timed out or job ended ({job.poll()}) waiting for {pattern!r}:\n"
                f"{_log_text(tmp_path)[-4000:]}")


def _wait_until(condition, job, tmp_path, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and job.poll() is None:
        _note_checkpoints(tmp_path)
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out or job ended ({job.poll()}) waiting for {what}:\n"
                f"{_log_text(tmp_path)[-4000:]}")


def _wait_for_end(job, tmp_path, timeout_s) -> None:
    """Until the job ends, noting every checkpoint that lands (a resume must start from one)."""
    deadline = time.monotonic() + timeout_s
    while job.poll() is None:
        assert time.monotonic() < deadline, f"the job did not end:\n{_log_text(tmp_path)[-4000:]}"
        _note_checkpoints(tmp_path)
        time.sleep(0.5)


def _verified_checkpoints(run_dir) -> dict[str, tuple[int, int]]:
    """The run's checkpoints seen complete and verified so far: folder -> (epoch, steps done)."""
    _note_checkpoints(run_dir.parent.parent)
    return {folder: at for folder, at in SEEN_VERIFIED.items() if Path(folder).parent == run_dir}


STEP = r"\[rn50 rank0\] epoch (\d+) step (\d+) "
RESUMED = r"resumed from \S+ \(epoch (\d+), (\d+) steps done, saved by (\d+) workers, now (\d+)\)"
PER_EPOCH, EVERY_STEPS = 512 // 32, 5  # steps per epoch (jobs.reference_maths); checkpoints
START_EPOCH = 1  # the runs start where the reference's epoch 0 ended
PID_STEP = r"pid=(\d+)\)\S* " + STEP
PID_RESUMED = r"pid=(\d+)\)\S* \[rn50 rank0\] " + RESUMED
PID_RESUMED_FROM = PID_RESUMED.replace(r"resumed from \S+", r"resumed from (\S+)")


def _global_steps(epoch_and_step: tuple, per_epoch: int, done: bool = False) -> int:
    """Global steps done at (epoch, step): a step line's step is 0-based, a resume's a count."""
    return int(epoch_and_step[0]) * per_epoch + int(epoch_and_step[1]) + (1 if done else 0)


HOLDER = """
import ray, sys
ray.init(address=sys.argv[1])
holder = ray.remote(num_cpus=1)(type("OtherJob", (), {"ready": lambda self: True})).remote()
ray.get(holder.ready.remote())
print("holding one CPU", flush=True)
sys.stdin.read()  # until the test ends this job
"""


def test_an_elastic_run_starts_with_what_is_free_and_grows_when_another_job_ends(
        reference, cluster, tmp_path):
    """Red if the group were sized from the cluster's totals (Ray 2.60's elastic policy: it asks
    for 2 workers and waits until the other job ends), never grew, or the growth changed the
    maths (the weights would differ from the fixed-size run's)."""
    _, _, straight = reference
    other = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.gcs_address],
                             env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    said = []
    while not said or "holding one CPU" not in said[-1]:  # Ray's connect lines come first
        said.append(other.stdout.readline())
        assert said[-1] and len(said) < 50, f"the other job did not start: {said}"
    job, log = _start_driver(cluster, tmp_path, "beside", reference, "scaling.resize_check_s=5")
    try:
        _wait_for(r"starting the worker group with 1 workers", job, tmp_path, 240)
        _wait_for(STEP, job, tmp_path, 120)
        trained_after_s = time.monotonic() - job.launched
        # A checkpoint in storage first: growing restarts the group from the newest one.
        _wait_until(lambda: len(_verified_checkpoints(tmp_path / "runs" / "beside")) > 1, job,
                    tmp_path, 120, "a checkpoint in storage beside the copy it started from")
        other.stdin.close()  # the other job ends: its CPU is free
        other.wait(timeout=60)
        _wait_for(r"room for 2 workers now: growing the group from 1", job, tmp_path, 180)
        _wait_for(r"saved by 1 workers, now 2\)", job, tmp_path, 240)
        _wait_for_end(job, tmp_path, 900)
    finally:
        other.kill()
        if job.poll() is None:
            job.kill()
        log.close()
    output = _log_text(tmp_path)
    assert job.returncode == 0, output[-4000:]
    assert "Detected ready resources for 2 workers" not in output
    result = result_line(output)
    _check_no_work_lost(output, result, straight)
    sizes = [int(m.value) for m in sorted(MlflowClient(result["tracking_uri"]).get_metric_history(
        result["mlflow_run_id"], "world_size"), key=lambda m: (m.step, m.timestamp))]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    print(f"trained with 1 worker {trained_after_s:.0f} s after its launch, then grew to 2")


def test_a_lost_node_shrinks_the_run_and_a_new_one_grows_it_back(reference, cluster, tmp_path):
    """Turns red if an elastic run waits for a replacement instead of going on with the survivor,
    if it never grows back, if a resume on another world size loses or repeats steps (the weights
    would differ from the fixed-size run's; the step lines would not cover every step), or if
    world_size is not in MLflow over time."""
    _, _, straight = reference
    survivor, victim = cluster.added
    job, log = _start_driver(cluster, tmp_path, "elastic", reference)
    try:  # two workers training:
        _wait_for(rf"checkpoint at epoch {START_EPOCH} step 5", job, tmp_path, 300)
        _wait_until(lambda: (START_EPOCH, 5) in _verified_checkpoints(
            tmp_path / "runs" / "elastic").values(), job, tmp_path, 60,
            "the step-5 checkpoint in storage")
        newest_at_kill = _global_steps(  # the newest checkpoint in storage
            max(_verified_checkpoints(tmp_path / "runs" / "elastic").values()), PER_EPOCH)
        killed_at, at_kill = time.time(), len(_log_text(tmp_path))
        kill_tree(cluster.worker_raylets()[victim])  # the node is gone; nothing replaces it
        # The resume onto one worker (a late copy of an earlier resume line can still arrive).
        shrunk = _wait_for(RESUMED.replace(r"now (\d+)", "now (1)"), job, tmp_path, 300,
                           after=at_kill)[0]
        assert shrunk[2:] == ("2", "1"), shrunk
        at_shrink = len(_log_text(tmp_path))
        _wait_for(STEP, job, tmp_path, 240, after=at_shrink)
        survivor_trains_at = time.time()
        _wait_for(STEP, job, tmp_path, 240, count=3, after=at_shrink)  # trains on one worker
        assert victim not in cluster.worker_raylets() and survivor in cluster.worker_raylets()
        cluster.add_node()  # capacity returns
        _wait_for(r"saved by 1 workers, now 2\)", job, tmp_path, 300, after=at_shrink)
        _wait_for_end(job, tmp_path, 900)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    output = _log_text(tmp_path)
    assert job.returncode == 0, output[-4000:]
    result = result_line(output)
    trained, starts = _check_no_work_lost(output, result, straight)
    history = sorted(MlflowClient(result["tracking_uri"]).get_metric_history(
        result["mlflow_run_id"], "world_size"), key=lambda m: (m.step, m.timestamp))
    sizes = [int(m.value) for m in history]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    shrink_step = history[sizes.index(1)].step
    assert 0 < shrink_step < history[-1].step, [(m.step, m.value) for m in history]
    shrink, grow = starts[1], next(s for s in starts[2:] if s[4] == "2")  # [0]: the copy's
    first_pid = re.search(PID_STEP, output).group(1)
    # The shrink resumed from the newest checkpoint that was in storage when the node went.
    assert _global_steps(shrink[1:3], PER_EPOCH) >= newest_at_kill, (shrink, newest_at_kill)
    _record(survivor_trains_after_s=survivor_trains_at - killed_at,
            steps_lost=0, final_weights_equal_the_fixed_size_runs=1,
            steps_repeated_at_shrink=trained[first_pid] - _global_steps(shrink[1:3], PER_EPOCH),
            steps_repeated_at_growth=trained[shrink[0]] - _global_steps(grow[1:3], PER_EPOCH))


def _check_no_work_lost(output: str, result: dict, straight: str):
    """Assert what "no work lost" means for a run with restarts: its final weights are the
    fixed-size run's, each epoch is logged once, no step was never trained, and every resume
    started from a checkpoint that verifies, at a step the groups before it had reached, repeating
    no more than those since it (at most two checkpoints' worth: one may be in flight).
    Returns (rank 0 pid -> global steps its group trained, the resumes in order as (pid, epoch,
    steps done, saved by, now) tuples)."""
    assert fingerprint(result["checkpoint"]) == straight, "not the fixed-size run's weights"
    assert result["epochs"] == REFERENCE_EPOCHS, result
    assert epochs_logged(result) == list(range(START_EPOCH, REFERENCE_EPOCHS)), \
        epochs_logged(result)
    trained: dict[str, int] = {}  # a group's rank 0 pid -> global steps the group had done
    order: dict[str, None] = {}  # the groups' rank 0 pids, in the order they appeared
    resumes: dict[str, tuple] = {}  # pid -> (folder, epoch, steps, saved by, now)
    for line in output.splitlines():  # lines repeat (every node streams the logs): by pid
        if step := re.search(PID_STEP, line):
            pid = step.group(1)
            trained[pid] = max(trained.get(pid, 0), _global_steps(step.groups()[1:], PER_EPOCH,
                                                                  True))
            order.setdefault(pid)
        elif resume := re.search(PID_RESUMED_FROM, line):
            resumes.setdefault(resume.group(1), resume.groups()[1:])
            order.setdefault(resume.group(1))
    assert set(range(START_EPOCH * PER_EPOCH + 1, REFERENCE_EPOCHS * PER_EPOCH + 1)) <= {
        _global_steps(m[1:], PER_EPOCH, True) for m in re.findall(PID_STEP, output)}, \
        "a step no group trained"
    groups = list(order)
    for pid, (folder, epoch, steps, _, _) in resumes.items():
        assert SEEN_VERIFIED.get(folder) == (int(epoch), int(steps)), (folder, SEEN_VERIFIED)
        reached = max((trained.get(g, 0) for g in groups[:groups.index(pid)]),
                      default=START_EPOCH * PER_EPOCH)  # the first group: the copy's point
        point = _global_steps((epoch, steps), PER_EPOCH)
        assert point <= reached <= point + 2 * EVERY_STEPS, (pid, point, reached)
    return trained, [(pid, *rest[1:]) for pid, rest in resumes.items()]


def _record(**figures) -> None:
    """benchmarks/results/elastic.json, when RN50_RECORD_RESULTS=1."""
    print("elastic rehearsal:", figures)
    if os.environ.get("RN50_RECORD_RESULTS") != "1":
        return
    from benchmarks.results import write_result
    write_result("elastic", {k: round(v, 1) for k, v in figures.items()}, context={
        "setup": "head + 2 raylets (1 CPU each) on the 2-core machine, demo recipe epochs 2-4 "
                 "of 5 (from the fixed-size run's epoch-1 checkpoint), 16 steps each "
                 "(tests/integration/jobs.py reference_maths), scaling.num_workers="
                 "[1,2], start_timeout_s 45, resize_check_s 10, checkpoint.every_steps 5, local "
                 "storage; compared with the same run at a fixed 2 workers"},
        argv=["-m", "pytest", "tests/integration/test_elastic_cluster.py"])
