"""Never wait forever: a run and a sweep started while another job holds the CPUs they need.

A 2-CPU cluster this test starts; the other job is a Ray actor reserving both CPUs. Each run or
sweep either completes after the CPUs are released or ends, within its start timeout, with exit
code 4 and a message naming what it asked for and who holds it; neither hangs, and nothing a
timed-out start reserved is left behind."""
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

START_TIMEOUT_S = 30
# Python, MLflow, Ray and Train controller start-up on a busy shared 2-core machine (seen: 80 s):
# what a job may take beyond its start timeout, counted from the moment it was launched.
OVERHEAD_S = 180


@pytest.fixture
def two_cpus():
    """A one-node cluster with 2 CPUs, this process its first driver; yields its address."""
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


def _blocker():
    blocker = Blocker.remote()
    ray.get(blocker.ready.remote(), timeout=60)
    return blocker


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
                   f"scaling.start_timeout_s={START_TIMEOUT_S}", *extra], address,
                  tmp_path / f"{name}.log")


def _sweep_job(tmp_path, address: str):
    space = tmp_path / "one_trial.yaml"
    space.write_text(yaml.safe_dump({
        "base_recipe": "demo", "metric": "val_top1", "num_samples": 1, "search": "random",
        "overrides": [*small(tmp_path, epochs=1), f"scaling.start_timeout_s={START_TIMEOUT_S}",
                      f"tracking.uri=sqlite:///{tmp_path / 'sweep-mlflow.db'}"],
        "space": {"optim.lr": {"grid": [0.05]}}}))
    return _start(["ray_jobs/tune_imagenette.py", "--space", str(space), "--name", "sweep",
                   "--storage", str(tmp_path / "sweeps")], address, tmp_path / "sweep.log")


def _wait(job, timeout_s: float) -> float:
    """Seconds from `job`'s launch until it ended; fails (after killing it) if it is still running
    `timeout_s` after its launch."""
    try:
        job.wait(timeout=max(0.0, job.launched + timeout_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
        pytest.fail(f"still waiting {timeout_s:.0f} s after its launch: it would have hung")
    return time.monotonic() - job.launched


def _no_reservation_left() -> None:
    left = {pg_id: pg["state"] for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}
    assert not left, f"placement groups left behind by ended runs: {left}"


def _assert_clear_failure(output: str) -> None:
    assert "the worker group did not start within" in output, output[-3000:]
    assert re.search(r"(?:at least )?\d workers x \{CPU: 1\}", output), output[-3000:]
    assert "scaling.start_timeout_s" in output, output[-3000:]


def test_a_run_and_a_sweep_that_cannot_get_their_cpus_end_in_time_naming_them(tmp_path,
                                                                               two_cpus):
    blocker = _blocker()
    # Elastic runs: [2, 4] tries a group of 2 (the held CPUs count as the cluster's); [3, 4] can
    # never start (Ray 2.60 then waits without a deadline; ours is the same start timeout).
    jobs = {"starved": _run_job(tmp_path, two_cpus, "starved"),
            "elastic": _run_job(tmp_path, two_cpus, "elastic", "scaling.num_workers=[2,4]",
                                f"tracking.uri=sqlite:///{tmp_path / 'elastic-mlflow.db'}"),
            "elastic3": _run_job(tmp_path, two_cpus, "elastic3", "scaling.num_workers=[3,4]",
                                 f"tracking.uri=sqlite:///{tmp_path / 'elastic3-mlflow.db'}"),
            "sweep": _sweep_job(tmp_path, two_cpus)}
    for name, job in jobs.items():
        seconds = _wait(job, START_TIMEOUT_S + OVERHEAD_S)
        output = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert job.returncode == 4, output[-3000:]
        _assert_clear_failure(output)
        # Who holds the CPUs: the other job's actor, named with its job's entrypoint.
        assert "actor Blocker" in output and "pytest" in output and "free" in output, output[-3000:]
        assert "RESULT" not in output
        print(f"{name} ended with exit 4 after {seconds:.0f} s")
    # More than the cluster has: Ray's elastic policy starts nothing and would wait forever.
    assert "fewer workers than the elastic minimum fit for" in \
        (tmp_path / "elastic3.log").read_text()
    assert "no trial of the sweep could get its resources" in (tmp_path / "sweep.log").read_text()
    _no_reservation_left()
    del blocker


def test_a_sweep_and_a_run_beside_a_job_holding_their_cpus_finish_or_fail_clearly(tmp_path,
                                                                                  two_cpus):
    blocker = _blocker()
    jobs = {"run": _run_job(tmp_path, two_cpus, "run"), "sweep": _sweep_job(tmp_path, two_cpus)}
    time.sleep(10)
    ray.kill(blocker)  # the other job ends: both CPUs are free again
    outcomes = {}
    for name, job in jobs.items():
        # A completing job trains one small epoch after the release; a failing one has its
        # start timeout; both get the same start-up allowance.
        seconds = _wait(job, START_TIMEOUT_S + OVERHEAD_S + 300)
        output = (tmp_path / f"{name}.log").read_text(errors="replace")
        outcomes[name] = job.returncode
        assert job.returncode in (0, 4), f"{name}: {output[-3000:]}"
        if job.returncode == 0:
            assert "RESULT " in output
        else:
            _assert_clear_failure(output)
        print(f"{name}: exit {job.returncode} after {seconds:.0f} s")
    assert 0 in outcomes.values(), f"the released CPUs went to neither job: {outcomes}"
    _no_reservation_left()
