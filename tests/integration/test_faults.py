"""The fault matrix on real processes: a SIGKILLed worker, a corrupt checkpoint, a killed driver.

Composer-style: a run interrupted and resumed must end with weights bit-identical to the same run
left alone, compared by the SHA-256 fingerprint of every tensor (`python -m rn50.checkpoint`).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.jobs import REPO, run_job

STEPS_PER_EPOCH = 8  # 256 images / global batch 32


def common(tmp: Path, epochs: int = 2) -> list[str]:
    """Two workers, 8 steps per epoch, a checkpoint every 3 steps and at each epoch end."""
    return [f"data.root={tmp / 'digits'}", f"train.epochs={epochs}", "data.max_train_samples=256",
            "data.max_val_samples=64", "train.global_batch_size=32",
            "optim.lr_reference_batch_size=32", "tracking.log_model=false",
            "checkpoint.every_steps=3", "checkpoint.keep_last=3",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]


def fingerprint(checkpoint: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "rn50.core.checkpoint", "fingerprint", checkpoint],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: the same run, never interrupted."""
    tmp = tmp_path_factory.mktemp("faults")
    code, output, result = run_job(["--name", "straight", "--storage", str(tmp / "runs"), *common(tmp)])
    assert code == 0, output[-4000:]
    return tmp, result


def test_sigkilled_worker_resumes_mid_epoch_to_identical_weights(straight):
    tmp, reference = straight
    code, output, result = run_job(["--name", "killed", "--storage", str(tmp / "runs"), *common(tmp),
                                    f"faults.kill_at_step={STEPS_PER_EPOCH + 5}",
                                    f"faults.marker_path={tmp / 'kill.marker'}"])
    assert code == 0, output[-4000:]
    assert "SIGKILL to worker rank 1 at step 13" in output
    assert "(epoch 1, 3 steps done)" in output, output[-6000:]  # the mid-epoch checkpoint
    assert fingerprint(result["checkpoint"]) == fingerprint(reference["checkpoint"])


def test_fingerprint_tells_different_states_apart(straight):
    """Negative control: the reference run's own earlier checkpoint must not compare equal."""
    tmp, reference = straight
    checkpoints = sorted(p for p in (tmp / "runs" / "straight").glob("checkpoint_2*"))
    assert len(checkpoints) >= 2
    assert fingerprint(str(checkpoints[-2])) != fingerprint(reference["checkpoint"])


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(straight):
    tmp, reference = straight
    newest = Path(reference["checkpoint"])
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn upload
    code, output, result = run_job(["--name", "straight", "--storage", str(tmp / "runs"),
                                    *common(tmp, epochs=3)])
    assert code == 0, output[-4000:]
    assert f"skipping checkpoint {newest}" in output and "truncated" in output
    assert "resumed from" in output and result["epochs"] == 3


def test_killed_driver_resubmitted_continues_the_run(tmp_path):
    args = [sys.executable, "ray_jobs/train_full.py", "--name", "driver", "--storage",
            str(tmp_path / "runs"), *common(tmp_path, epochs=3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list((tmp_path / "runs" / "driver").glob("checkpoint_2*/manifest.json")):
        assert driver.poll() is None and time.time() < deadline, "no checkpoint before the kill"
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    code, output, result = run_job(["--name", "driver", "--storage", str(tmp_path / "runs"),
                                    *common(tmp_path, epochs=3)])
    assert code == 0, output[-4000:]
    assert "resumed from" in output and "(resumed)" in output and result["epochs"] == 3, output[-6000:]
