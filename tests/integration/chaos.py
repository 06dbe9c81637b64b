"""A seeded chaos controller: one elastic training run on the rehearsal cluster (a head without
CPUs and two 1-CPU nodes, tests/integration/fake_cluster.py) while faults hit it, one at a time,
at moments drawn from the controller's own `random.Random(seed)`. Every fault comes from outside
the product: a pid SIGKILLed, a raylet taken, a spot notice from a fake IMDS, the S3 server
stopped, a file cut short in storage, another job holding a CPU. Nothing in rn50/ knows.

Used by tests/integration/test_chaos.py (3 faults) and benchmarks/chaos.py (20 and more). The
run is `jobs.reference_maths` at 1 to 2 workers: 2 micro-batches per step either way, the same
arithmetic to the bit, so the run must end on the weights of the straight fixed-size run.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyarrow import fs as pafs

from rn50.io import checkpoints as ckpt
from rn50.io import storage
from tests.integration.chaos_faults import Faults
from tests.integration.fake_cluster import REPO, FakeCluster
from tests.integration.jobs import reference_maths

PER_EPOCH, EVERY_STEPS = 512 // 32, 5  # steps per epoch (reference_maths); a checkpoint every 5
KINDS = ("worker_kill", "node_lost", "spot_notice", "driver_kill", "torn_checkpoint", "cpu_hog",
         "s3_outage")
STEP = re.compile(r"pid=(\d+)\)\S* \[rn50 rank0\] epoch (\d+) step (\d+) ")
RESUMED = re.compile(r"pid=(\d+)\)\S* \[rn50 rank0\] resumed from (\S+) \(epoch (\d+), (\d+) "
                     r"steps done, saved by (\d+) workers, now (\d+)\)")
# What the run did about a fault, as its log says it.
RESPONSES = {"restart": RESUMED,
             "skipped torn checkpoint": re.compile(r"skipping checkpoint \S+"),
             "grow": re.compile(r"room for \d+ workers now: growing the group from \d+"),
             "preemption checkpoint": re.compile(
                 r"checkpoint at epoch \d+ step \d+ \(preemption\)"),
             "upload retry": re.compile(r"failed \(attempt \d+/"),
             "outage ridden out": re.compile(r"took \d+ s \(attempt \d+/\d+\): the storage"),
             "controller restart": re.compile(r"Train controller failed")}


def draw_plan(seed: int, kinds, count: int) -> list[str]:
    """`count` faults in a seeded random order, every kind at least once."""
    rng = random.Random(f"plan-{seed}")
    plan = [*kinds, *(rng.choice(kinds) for _ in range(count - len(kinds)))]
    rng.shuffle(plan)
    return plan


def global_steps(epoch, step, done: bool = False) -> int:
    """Global steps done at (epoch, step): a step line's step is 0-based, a resume's a count."""
    return int(epoch) * PER_EPOCH + int(step) + (1 if done else 0)


@dataclass
class Fault:
    """One injected fault and what became of it."""
    kind: str
    at_s: float  # since the run's first start
    steps_done: int  # global steps the run had logged when it hit
    detail: dict = field(default_factory=dict)
    regained_after_s: float | None = None  # until training passed `steps_done` (None: never)
    interrupted: bool = False  # a new worker group took over
    time_lost_s: float | None = None  # regained_after_s less the steps trained in that time
    responses: dict = field(default_factory=dict)  # what the run did, from its log
    log_offset: int = 0


class Chaos(Faults):
    """The run, its cluster and the faults; `run()` drives it all and returns the account."""

    def __init__(self, cluster: FakeCluster, workdir: Path, digits: Path, epochs: int, seed: int,
                 plan: list[str], gap_s=(3.0, 10.0), s3=None, regain_timeout_s: float = 300,
                 start_from: Path | None = None):
        self.cluster, self.workdir, self.digits, self.epochs = cluster, workdir, digits, epochs
        self.rng, self.plan, self.gap_s, self.s3 = random.Random(seed), plan, gap_s, s3
        self.regain_timeout_s, self.start_from = regain_timeout_s, start_from
        self.start_step = 0  # global steps done before the run (in `start_from`)
        self.name, self.log_path = f"chaos{seed}", workdir / "job.log"
        self.storage = f"s3://{s3.bucket}/chaos" if s3 else str(workdir / "runs")
        self.faults: list[Fault] = []
        self.verified: dict[str, tuple[int, int]] = {}  # checkpoint folder -> (epoch, steps)
        self.torn: set[str] = set()  # folders this controller cut short
        self.helpers: list[subprocess.Popen] = []  # other jobs, watchers: ended at the end
        self.driver: subprocess.Popen | None = None
        self.started = 0.0
        self._read_to = 0  # how far steps_done has read the log (bytes)
        self._most: dict[str, int] = {}  # a group's rank 0 pid -> the most global steps it did
        self._first_seen: dict[str, int] = {}  # pid -> log offset (bytes) of its first step
        self._arrivals: list[tuple[float, int]] = []  # (when, steps) as the most steps grew

    # The driver: the user's command, on this machine, joined to the cluster.
    def command(self) -> list[str]:
        """train_full.py as an elastic run of the reference's maths, faults or not."""
        return [sys.executable, "ray_jobs/train_full.py", "--recipe", "demo", "--name", self.name,
                "--storage", self.storage, *reference_maths(self.digits, self.epochs),
                "scaling.num_workers=[1,2]", "scaling.resize_check_s=5",
                "scaling.start_timeout_s=45", f"checkpoint.every_steps={EVERY_STEPS}",
                "checkpoint.keep_last=4", "checkpoint.keep_best_by=none",
                "checkpoint.max_failures=100", "checkpoint.preemption_check_every_steps=2",
                "checkpoint.preemption_poll_s=1", "train.log_every_steps=1",
                f"tracking.uri=sqlite:///{self.workdir / 'mlflow.db'}"]

    def start_driver(self) -> None:
        env = {**self.cluster.env, "RAY_ADDRESS": self.cluster.gcs_address, "RAY_DEDUP_LOGS": "0",
               **(self.s3.env() if self.s3 else {})}
        with open(self.log_path, "a") as log:  # one log across resubmissions
            self.driver = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def steps_done(self) -> int:
        """The most global steps any group has logged (the log read on from where it was)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._read_to)
            data = log.read()
        data = data[:data.rfind(b"\n") + 1]  # a partly written line is read again next time
        self._read_to += len(data)
        for pid, epoch, step in STEP.findall(data.decode(errors="replace")):
            self._first_seen.setdefault(pid, self._read_to)
            self._most[pid] = max(self._most.get(pid, 0), global_steps(epoch, step, True))
        most = max(self._most.values(), default=0)
        if not self._arrivals or most > self._arrivals[-1][1]:
            self._arrivals.append((time.monotonic(), most))
        return most

    def step_s(self) -> float:
        """The run's recent time per step, undisturbed (the median over its last 20 steps)."""
        recent = self._arrivals[-21:]
        gaps = sorted((b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(recent, recent[1:]))
        return gaps[len(gaps) // 2] if gaps else 0.0

    def regained(self, steps: int, since: int) -> bool:
        """Training is past `steps` again: a group that started after log offset `since` trained
        past it, or the old group went on well past it (the fault did not interrupt it; a dying
        group may still log a step in flight)."""
        self.steps_done()
        return any(most > steps + (0 if self._first_seen[pid] > since else EVERY_STEPS)
                   for pid, most in self._most.items())

    def now_s(self) -> float:
        return time.monotonic() - self.started

    # Storage, read through the product's own checkpoint functions (local folders or S3 alike).
    def run_location(self):
        return storage.filesystem_and_path(f"{self.storage}/{self.name}")

    def note_checkpoints(self, recheck: bool = False) -> list[str]:
        """Record every checkpoint that verifies now (each once, unless `recheck`); the paths of
        those that did, newest first."""
        run = self.run_location()
        try:
            paths = ckpt.checkpoints_newest_first(run)
        except OSError:
            return []  # storage down: looked at again next time
        good = []
        for path in paths:
            folder = path.rsplit("/", 1)[1]
            if folder in self.torn or (folder in self.verified and not recheck):
                good += [path] if folder in self.verified and folder not in self.torn else []
                continue
            try:
                summary = ckpt.verify((run[0], path), hashes=False)["summary"]
            except Exception:  # noqa: BLE001 - being written, or deleted
                continue
            self.verified.setdefault(folder, (summary["epoch"],
                                              summary.get("steps_done", PER_EPOCH)))
            good.append(path)
        return good

    def wait(self, condition, timeout_s: float, what: str):
        """Poll `condition` (noting checkpoints) until true; raises on timeout or a dead job."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.note_checkpoints()
            value = condition()
            if value:
                return value
            if self.driver.poll() is not None:
                raise RuntimeError(f"the job ended ({self.driver.returncode}) waiting for {what}")
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout_s:.0f} s for {what}:\n{self.log()[-3000:]}")

    def pause(self, seconds: float, look: bool = True) -> None:
        """Let the run go on for `seconds` (noting its checkpoints unless storage is down)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if look:
                self.note_checkpoints()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    # The run: faults one at a time, each at a moment drawn after the run got over the last.
    def run(self, finish_timeout_s: float = 900) -> dict | None:
        """Train with the plan's faults; returns the job's RESULT record (None if it failed)."""
        if self.start_from is not None:  # a copy of another run's checkpoint: the run goes on
            summary = ckpt.verify(str(self.start_from), hashes=False)["summary"]
            self.start_step = global_steps(summary["epoch"], summary.get("steps_done", PER_EPOCH))
            filesystem, run = self.run_location()
            filesystem.create_dir(f"{run}/{self.start_from.name}")
            pafs.copy_files(str(self.start_from), f"{run}/{self.start_from.name}",
                            destination_filesystem=filesystem)
        self.started = time.monotonic()
        self.start_driver()
        try:
            self.wait(lambda: self.steps_done() > self.start_step + 1, 300, "training to start")
            queue, last = list(self.plan), self.epochs * PER_EPOCH - 2 * EVERY_STEPS
            while queue and self.driver.poll() is None and self.steps_done() < last:
                self.pause(self.rng.uniform(*self.gap_s))
                if self.driver.poll() is not None or self.steps_done() >= last:
                    break  # too near the end for a fault to land
                self._inject(queue)
            # Still noting checkpoints: a restart after the last fault resumes from one of them.
            self.wait(lambda: self.driver.poll() is not None, finish_timeout_s, "the run's end")
        finally:
            self.stop_helpers()
        from tests.integration.faults import result_of
        return result_of(self.log()) if self.driver.returncode == 0 else None

    def _inject(self, queue: list[str]) -> None:
        at, steps, offset = self.now_s(), self.steps_done(), len(self.log())
        since, step_s = self._read_to, self.step_s()
        detail = getattr(self, queue[0])()
        if detail is None:
            return  # not applicable now: drawn again after the next pause
        fault = Fault(queue.pop(0), round(at, 1), steps, detail, log_offset=offset)
        self.faults.append(fault)
        print(f"[chaos] {fault.at_s:.0f} s, step {steps}: {fault.kind} {detail}", flush=True)
        self.wait(lambda: self.regained(steps, since) or self.driver.poll() == 0,
                  self.regain_timeout_s, f"training past step {steps} after {fault.kind}")
        fault.regained_after_s = round(self.now_s() - at, 1)
        fault.interrupted = any(first > since for first in self._first_seen.values())
        # What it cost: the time to get past that step less what the steps since took anyway.
        fault.time_lost_s = round(max(0.0, fault.regained_after_s
                                      - (self.steps_done() - steps) * step_s), 1)

    def stop_helpers(self) -> None:
        """End the other jobs this controller started (the driver too, if it still runs)."""
        for process in self.helpers:
            process.kill()
            process.wait()
        if self.driver is not None and self.driver.poll() is None:
            os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver.wait()
