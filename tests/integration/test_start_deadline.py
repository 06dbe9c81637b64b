"""Never wait forever: a run and a sweep started while another job holds the CPUs they need.

A 2-CPU cluster this test starts (no autoscaler); the other job is a Ray actor reserving both CPUs,
made by this test process. Each run or sweep either completes after the CPUs are released or
ends, once its start timeout has passed with nothing launching for it, with exit code 4 and a
message naming what it asked for and who holds it; one that could never fit ends at once; none
hangs, and nothing a timed-out start reserved is left behind."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import ray
import yaml

from tests.integration.jobs import REPO, small

START_TIMEOUT_S = 20
CHECK_S = 5  # scaling.start_check_s: how often a waiting start looks again
# Python, MLflow, Ray and Train controller start-up on a busy shared 2-core machine (seen: 80 s):
# what a job may take before it starts waiting, counted from the moment it was launched. The wait
# itself is timed from the first "waiting for" line the job prints to its exit.
OVERHEAD_S = 180


@pytest.fixture(scope="module")
def two_cpus():
    """A one-node cluster with 2 CPUs, this process its first driver, for both tests (each test's
    blocker is gone when it ends); yields its address."""
    from ray.cluster_utils import Cluster
    # Its own dashboard port: the state API (who holds what) is served by the dashboard, and
    # another Ray on this shared machine may have the default one.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": port})
    ray.init(address=cluster.address)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@ray.remote(num_cpus=2)
class Blocker:
    """The other job: an actor holding both CPUs until killed."""

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture
def blocker(two_cpus):
    """The other job, holding both CPUs of `two_cpus` until the test kills it or ends."""
    holder = Blocker.remote()
    ray.get(holder.ready.remote(), timeout=60)
    holder.process_id = ray.get(holder.pid.remote(), timeout=60)
    try:
        yield holder
    finally:
        ray.kill(holder)  # the next test starts with both CPUs free, whatever this one did


def _start(script: list[str], address: str, log_path):
    env = {**os.environ, "RAY_ADDRESS": address, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, *script], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    job.launched = time.monotonic()
    return job


def _run_job(tmp_path, address: str, name: str, *extra: str):
    return _start(["ray_jobs/train_full.py", "--recipe", "demo", "--name", name,
                   "--storage", str(tmp_path / "runs"), *small(tmp_path, epochs=1),
                   f"tracking.uri=sqlite:///{tmp_path / 'run-mlflow.db'}",
                   f"scaling.start_timeout_s={START_TIMEOUT_S}", f"scaling.start_check_s={CHECK_S}",
                   *extra], address,
                  tmp_path / f"{name}.log")


def _sweep_job(tmp_path, address: str):
    space = tmp_path / "one_trial.yaml"
    space.write_text(yaml.safe_dump({
        "base_recipe": "demo", "metric": "val_top1", "num_samples": 1, "search": "random",
        "overrides": [*small(tmp_path, epochs=1), f"scaling.start_timeout_s={START_TIMEOUT_S}",
                      f"scaling.start_check_s={CHECK_S}",
                      f"tracking.uri=sqlite:///{tmp_path / 'sweep-mlflow.db'}"],
        "space": {"optim.lr": {"grid": [0.05]}}}))
    return _start(["ray_jobs/tune_imagenette.py", "--space", str(space), "--name", "sweep",
                   "--storage", str(tmp_path / "sweeps")], address, tmp_path / "sweep.log")


def _wait_all(jobs: dict, tmp_path, timeout_s: float) -> dict[str, tuple[float, float | None]]:
    """{name: (seconds from its launch until it ended, seconds from its first "waiting for" line
    until it ended, None if it printed none)} for jobs running at once, all watched together (a
    job watched only after another ended could have ended unseen); fails (after killing them)
    if any is still running `timeout_s` after its launch."""
    waiting_since: dict[str, float] = {}
    ended: dict[str, float] = {}
    while len(ended) < len(jobs):
        now = time.monotonic()
        for name, job in jobs.items():
            if name in ended:
                continue
            text = (tmp_path / f"{name}.log").read_text(errors="replace")
            if name not in waiting_since and "[rn50] waiting for " in text:
                waiting_since[name] = now
            if job.poll() is not None:
                ended[name] = now
            elif now > job.launched + timeout_s:
                for other in jobs.values():
                    other.kill()
                pytest.fail(f"{name} still waiting {timeout_s:.0f} s after its launch: it would "
                            "have hung")
        time.sleep(0.5)
    return {name: (ended[name] - job.launched,
                   ended[name] - waiting_since[name] if name in waiting_since else None)
            for name, job in jobs.items()}


def _no_reservation_left() -> None:
    left = {pg_id: pg["state"] for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}
    assert not left, f"placement groups left behind by ended runs: {left}"


def _assert_clear_failure(output: str, blocker) -> None:
    assert "the worker group could not start: no room for the workers on nodes and no node " \
           f"launched for them within scaling.start_timeout_s={START_TIMEOUT_S}" in output, \
        output[-3000:]
    assert re.search(r"(?:at least )?\d workers x \{CPU: 1\}", output), output[-3000:]
    # Who holds the CPUs: the other job's actor, by its own process id.
    assert f"actor Blocker (pid {blocker.process_id}) {{CPU: 2}}" in output, output[-3000:]
    assert "Traceback" not in output, "an expected end shown as a crash"


def test_a_run_and_a_sweep_that_cannot_get_their_cpus_end_in_time_naming_them(tmp_path,
                                                                               two_cpus, blocker):
    # Elastic runs: [2, 4] waits for 2 (both held); [3, 4] can never fit on this cluster.
    jobs = {"starved": _run_job(tmp_path, two_cpus, "starved"),
            "elastic": _run_job(tmp_path, two_cpus, "elastic", "scaling.num_workers=[2,4]",
                                f"tracking.uri=sqlite:///{tmp_path / 'elastic-mlflow.db'}"),
            "elastic3": _run_job(tmp_path, two_cpus, "elastic3", "scaling.num_workers=[3,4]",
                                 f"tracking.uri=sqlite:///{tmp_path / 'elastic3-mlflow.db'}"),
            "sweep": _sweep_job(tmp_path, two_cpus)}
    timings = _wait_all(jobs, tmp_path, START_TIMEOUT_S + OVERHEAD_S)
    for name, job in jobs.items():
        seconds, waited_s = timings[name]
        output = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert job.returncode == 4 and "RESULT" not in output, output[-3000:]
        if name == "elastic3":  # more than the cluster has, and no autoscaler: no wait at all
            assert "at least 3 workers x {CPU: 1} can never fit here: this Ray cluster has " \
                   "{CPU: 2} in all, room for 2, and no autoscaler" in output, output[-3000:]
            assert waited_s is None, "it waited for what could never come"
        else:
            _assert_clear_failure(output, blocker)
            # The deadline applies once (give or take a look), not three times, nor early.
            slack_s = 2 * CHECK_S
            assert START_TIMEOUT_S - slack_s <= waited_s <= START_TIMEOUT_S + slack_s + 15, waited_s
        print(f"{name} ended with exit 4 after {seconds:.0f} s (waited {waited_s} s)")
    assert "no trial of the sweep could get its resources" in (tmp_path / "sweep.log").read_text()
    _no_reservation_left()


def test_a_sweep_and_a_run_beside_a_job_holding_their_cpus_finish_or_fail_clearly(
        tmp_path, two_cpus, blocker):
    jobs = {"run": _run_job(tmp_path, two_cpus, "run"), "sweep": _sweep_job(tmp_path, two_cpus)}
    time.sleep(10)
    ray.kill(blocker)  # the other job ends: both CPUs are free again
    outcomes = {}
    # A completing job trains one small epoch after the release; a failing one has its start
    # timeout; both get the same start-up allowance.
    timings = _wait_all(jobs, tmp_path, START_TIMEOUT_S + OVERHEAD_S + 300)
    for name, job in jobs.items():
        seconds, _ = timings[name]
        output = (tmp_path / f"{name}.log").read_text(errors="replace")
        outcomes[name] = job.returncode
        assert job.returncode in (0, 4), f"{name}: {output[-3000:]}"
        if job.returncode == 0:
            assert "RESULT " in output
        else:
            _assert_clear_failure(output, blocker)
        print(f"{name}: exit {job.returncode} after {seconds:.0f} s")
    assert 0 in outcomes.values(), f"the released CPUs went to neither job: {outcomes}"
    _no_reservation_left()
