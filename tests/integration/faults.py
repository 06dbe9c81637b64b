"""Faults injected from outside the product: processes killed by pid, checkpoints altered in
storage, a run's files replaced. Shared by the fault tests."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.integration.jobs import LEAN_TRACKING, REPO

STEPS_PER_EPOCH = 8  # 256 images / global batch 32


def common(tmp: Path, epochs: int = 2) -> list[str]:
    """Two workers, 8 steps per epoch, a checkpoint every 3 steps and at each epoch end; the last
    epoch's three kept (steps 3 and 6 and its end: the ones the tests resume from), at ~280 MB
    each."""
    return [f"data.root={tmp / 'digits'}", f"train.epochs={epochs}", "data.max_train_samples=256",
            "data.max_val_samples=64", "train.global_batch_size=32",
            "optim.lr_reference_batch_size=32", *LEAN_TRACKING,
            "checkpoint.every_steps=3", "checkpoint.keep_last=3",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]


@functools.cache  # a checkpoint folder never changes once written; each call is ~5 s of CPU
def fingerprint(checkpoint: str) -> str:
    """SHA-256 of a checkpoint's weights, through the documented CLI."""
    proc = subprocess.run([sys.executable, "-m", "rn50.checkpoint", "fingerprint", checkpoint],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.strip()


def summaries(run_dir: Path) -> dict[str, dict]:
    """checkpoint folder name -> its manifest summary, for every complete checkpoint of a run
    (an upload copies the manifest in any order: every file must be there at its size)."""
    found = {}
    for manifest in sorted(run_dir.glob("checkpoint_2*/manifest.json")):
        try:
            record = json.loads(manifest.read_text())
            if all((manifest.parent / name).stat().st_size == entry["size"]
                   for name, entry in record["files"].items()):
                found[manifest.parent.name] = record["summary"]
        except (OSError, ValueError, KeyError):
            continue  # being written right now
    return found


def start_job(args: list[str], log_path: Path) -> subprocess.Popen:
    """ray_jobs/train_full.py in its own process group, output to `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "ray_jobs/train_full.py", *args], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(predicate, job: subprocess.Popen, timeout_s: float, what: str,
               every_s: float = 0.05) -> None:
    """Poll `predicate` until true; fail if the job ends first or time runs out."""
    deadline = time.time() + timeout_s
    while not predicate():
        assert job.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def train_worker_pids(job: subprocess.Popen) -> list[int]:
    """Pids of the Ray Train worker processes under a job (Ray titles them RayTrainWorker)."""
    pids = []
    for process in psutil.Process(job.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group (the driver and the local Ray it started)."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def result_of(output: str) -> dict | None:
    """The job's RESULT line as a dict."""
    return next((json.loads(line[len("RESULT "):]) for line in output.splitlines()
                 if line.startswith("RESULT ")), None)
