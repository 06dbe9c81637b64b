"""What a checkpoint costs: size, training-loop stall per save, upload time to S3 (the local
SeaweedFS server) against a plain boto3 multipart upload of the same bytes, and the extra wall
time one SIGKILLed worker adds to a run.

    python -m benchmarks.checkpoint_costs            # size, stall, upload (~1 min)
    python -m benchmarks.checkpoint_costs --with-kill  # + straight vs killed demo runs (~3 min)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import write_result
from rn50.io.checkpoints import (CheckpointError, checkpoints_newest_first, save_checkpoint,
                                 verify)
from rn50.core.training_state import capture_rng_state
from rn50.config import ModelConfig
from rn50.core.model import build_model

REPO = Path(__file__).resolve().parents[1]


def resnet50_state() -> dict:
    """A real ResNet-50 (1000 classes) training state after one SGD step (momentum buffers set)."""
    model = build_model(ModelConfig(), 1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
            "steps_done": 1, "rng": capture_rng_state()}


def stall_and_size(state: dict, repeats: int = 3) -> tuple[float, float, Path]:
    """Mean seconds `save_checkpoint` blocks the loop (serialise + SHA-256), and the size in MB."""
    times, directory = [], None
    for _ in range(repeats):
        if directory is not None:
            shutil.rmtree(directory)  # keep only the last save: each is ~200 MB
        directory = Path(tempfile.mkdtemp(prefix="rn50-bench-"))
        start = time.perf_counter()
        save_checkpoint(directory, state, {"epoch": 0})
        times.append(time.perf_counter() - start)
    size_mb = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
    return sum(times) / len(times), size_mb, directory


def upload_times(directory: Path) -> dict:
    """Seconds to copy the checkpoint to S3 with pyarrow (what Ray uses) and with boto3."""
    import boto3
    import pyarrow.fs as pafs
    from tools.local_servers import S3Server

    server = S3Server(Path(tempfile.mkdtemp(prefix="rn50-s3-")))
    server.start()
    try:
        filesystem = pafs.S3FileSystem(endpoint_override=server.endpoint_url.split("//")[1],
                                       scheme="http", access_key=server.access_key,
                                       secret_key=server.secret_key, region="us-east-1")
        start = time.perf_counter()
        pafs.copy_files(str(directory), f"{server.bucket}/bench/pyarrow",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem,
                        use_threads=False)  # Ray 2.60 copies with use_threads=False
        pyarrow_s = time.perf_counter() - start
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=server.access_key,
                              aws_secret_access_key=server.secret_key)
        start = time.perf_counter()
        for path in directory.iterdir():
            client.upload_file(str(path), server.bucket, f"bench/boto3/{path.name}")
        boto3_s = time.perf_counter() - start
    finally:
        server.stop()
    return {"upload_pyarrow_s": pyarrow_s, "upload_boto3_s": boto3_s}


def _kill_a_worker_after_first_checkpoint(job: subprocess.Popen, run_dir: Path) -> float | None:
    """SIGKILL one Ray Train worker (by pid, from outside) once the run's first mid-epoch
    checkpoint has landed; return when (perf_counter seconds), or None if the run ended first."""
    import psutil
    while job.poll() is None:
        for path in checkpoints_newest_first(str(run_dir)):
            try:
                steps = verify(path, hashes=False)["summary"].get("steps_done", 0)
            except (OSError, CheckpointError, KeyError):
                continue
            workers = [p for p in psutil.Process(job.pid).children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            if steps and workers:
                workers[-1].kill()
                return time.perf_counter()
        time.sleep(0.05)
    return None


def _timed_run(args: list[str], kill_in: Path | None = None) -> tuple[float, dict[str, float]]:
    """Run the job (killing a worker once if `kill_in`, its run folder, is given); return its
    wall seconds and when (seconds from start) the kill and the resume happened."""
    import threading
    marks: dict[str, float] = {}
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # `-m` from the checkout runs its own rn50, installed or not.
    with subprocess.Popen([sys.executable, "-m", "rn50.train", *args], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as job:
        if kill_in is not None:
            threading.Thread(target=lambda: marks.update(
                {"kill": (_kill_a_worker_after_first_checkpoint(job, kill_in) or start) - start}),
                daemon=True).start()
        for line in job.stdout:  # read as it streams: the arrival time is the measurement
            if "resumed from" in line and "resumed" not in marks:
                marks["resumed"] = time.perf_counter() - start
    if job.returncode != 0:
        raise RuntimeError(f"train_full.py {' '.join(args)} exited {job.returncode}")
    return time.perf_counter() - start, marks


def kill_overhead() -> dict:
    """Wall seconds of the same small demo run, straight and with one worker SIGKILLed, and the
    time from the kill to the restarted workers having loaded the checkpoint."""
    from rn50.data.small_datasets import prepare_digits
    tmp = Path(tempfile.mkdtemp(prefix="rn50-kill-"))
    prepare_digits(tmp / "digits")  # written before the timing, not inside the first run
    common = [f"data.root={tmp / 'digits'}", "train.epochs=2", "data.max_train_samples=256",
              "data.max_val_samples=64", "train.global_batch_size=32",
              "optim.lr_reference_batch_size=32", "tracking.log_model=false",
              "checkpoint.every_steps=3", f"tracking.uri=sqlite:///{tmp / 'm.db'}"]
    straight_s, _ = _timed_run(["--name", "straight", "--storage", str(tmp / "runs"), *common])
    killed_s, marks = _timed_run(["--name", "killed", "--storage", str(tmp / "runs"), *common],
                                 kill_in=tmp / "runs" / "killed")
    shutil.rmtree(tmp, ignore_errors=True)
    if "resumed" not in marks or not marks.get("kill"):
        raise RuntimeError("the worker kill did not happen before the run ended; nothing measured")
    return {"straight_run_s": straight_s, "killed_run_s": killed_s,
            "kill_recovery_overhead_s": killed_s - straight_s,
            "kill_to_resumed_s": marks["resumed"] - marks["kill"]}


def main() -> None:
    """Print a table and, last, one JSON line with every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-kill", action="store_true", help="also time a SIGKILL recovery")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stall_s, size_mb, directory = stall_and_size(resnet50_state())
    figures = {"ckpt_size_mb": size_mb, "ckpt_stall_s": stall_s, **upload_times(directory)}
    figures["upload_mb_per_s_pyarrow"] = size_mb / figures["upload_pyarrow_s"]
    figures["upload_mb_per_s_boto3"] = size_mb / figures["upload_boto3_s"]
    figures["pyarrow_vs_boto3_ratio"] = figures["upload_boto3_s"] / figures["upload_pyarrow_s"]
    if args.with_kill:
        figures.update(kill_overhead())
    for key, value in figures.items():
        print(f"{key:28s} {value:10.2f}")
    rounded = {k: round(v, 3) for k, v in figures.items()}
    print(json.dumps(rounded))
    write_result("checkpoint_costs", rounded)


if __name__ == "__main__":
    main()
