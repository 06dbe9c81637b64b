"""Run the main job the way a user does: as a subprocess of the repository's entrypoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_job(args, env_extra=None, timeout=900):
    """Run ray_jobs/train_full.py; return (returncode, combined output, RESULT dict or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "ray_jobs/train_full.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    result = next((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                   if line.startswith("RESULT ")), None)
    return proc.returncode, output, result


# What a test run does not need from MLflow (each on for the demo run, test_train_job.py, which
# checks them): the model logged, the end-of-run gallery (~5 s of the driver's CPU), the system
# metrics sampler (~3 s of MLflow start-up on each node's first worker, before its first step).
LEAN_TRACKING = ["tracking.log_model=false", "tracking.log_gallery=false",
                 "tracking.system_metrics_interval_s=0"]


def small(tmp_path, epochs=2):
    """Overrides that make a demo run take seconds: a subset of digits, few epochs."""
    return [f"data.root={tmp_path / 'digits'}", f"train.epochs={epochs}",
            "data.max_train_samples=256", "data.max_val_samples=128", "train.global_batch_size=32",
            "optim.lr_reference_batch_size=32", *LEAN_TRACKING]


# The maths of the runs that a fault interrupts on a cluster (the spot notice, the elastic
# shrink and growth) and of the one straight run they are all compared with: 2 micro-batches of
# 16 per step (2 workers, or 1 accumulating 2), 16 steps per epoch, 5 epochs. A resume at the
# same micro-batch count is bit-exact (test_faults.py), and one worker accumulating two
# micro-batches takes the two workers' step to the bit (tests/unit/test_elastic.py: the halves
# g0/2 + g1/2 are exact and two terms have one order), so every one of them must end on the
# straight run's weights exactly. The LR jumps 30x for the last epoch (a too-large LR, as a user
# may pick), so the run's best epoch is not its last (test_train_job.py checks the run keeps and
# uses that one; measured on 3 epochs: val top-1 9.4, 25.8, 13.3% with the jump at epoch 2).
REFERENCE_EPOCHS = 5


def reference_maths(digits_root: Path, epochs: int = REFERENCE_EPOCHS) -> list[str]:
    """The overrides that fix the maths of the reference run and of the runs compared with it
    (`epochs` other than 5 for a longer run: benchmarks/chaos.py)."""
    return [f"data.root={digits_root}", f"train.epochs={epochs}",
            "data.max_train_samples=512", "data.max_val_samples=64", "train.global_batch_size=32",
            "optim.lr_reference_batch_size=32", *LEAN_TRACKING,
            "schedule.warmup_epochs=0", "schedule.decay=step",
            f"schedule.step_milestones_epochs=[{epochs - 1}]", "schedule.step_gamma=30"]


def reference_epoch_end(reference_result: dict, epoch: int) -> Path:
    """The reference run's checkpoint at the end of `epoch` (it keeps every epoch's): a run that
    starts from a copy of it goes on from there with the same maths (the cluster tests)."""
    from rn50.io import checkpoints as ckpt
    for folder in sorted(Path(reference_result["checkpoint"]).parent.glob("checkpoint_2*")):
        summary = ckpt.verify(str(folder), hashes=False)["summary"]
        if summary["epoch"] == epoch and "steps_done" not in summary:
            return folder
    raise AssertionError(f"the reference run kept no end-of-epoch-{epoch} checkpoint")


def start_from_copy(checkpoint: Path, run_dir: Path) -> None:
    """Put a copy of `checkpoint` in the (local) storage of the run `run_dir`, as its newest."""
    import shutil
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, run_dir / checkpoint.name)


def result_line(output: str) -> dict:
    """The RESULT record a job printed (fails the test if there is none)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line:\n{output[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def epochs_logged(result: dict) -> list[int]:
    """The epochs of the run's val/top1 history in MLflow, as logged (a repeat shows twice)."""
    from mlflow import MlflowClient
    history = MlflowClient(result["tracking_uri"]).get_metric_history(result["mlflow_run_id"],
                                                                      "val/top1")
    return sorted(metric.step for metric in history)
