"""The fault matrix on real processes: a SIGKILLed worker, altered and corrupt checkpoints, a
killed driver, a Train controller that fails.

Composer-style: a run interrupted and resumed must end with weights bit-identical to the same run
left alone, compared by the SHA-256 fingerprint of every tensor (`python -m rn50.checkpoint`).
Every fault comes from outside the product: a process killed by pid, files changed in storage.
The negative controls show the comparison can fail: a resume one batch off, or without the
optimizer and RNG state, must end with different weights.
"""
import os
import shutil
import signal

import pytest
import torch
from mlflow import MlflowClient

from rn50.core.checkpoint import load_checkpoint, save_checkpoint
from tests.integration.faults import (STEPS_PER_EPOCH, common, fingerprint, kill_job, result_of,
                                      start_job, summaries, train_worker_pids, wait_until)
from tests.integration.jobs import run_job


# Every regularizer of the 75-80% recipes on at once: their random draws (augmentation policy,
# erasing, mixup/cutmix, stochastic depth, repeated augmentation) must resume to the bit too.
REGULARIZED = ["data.auto_augment=trivialaugment_wide", "data.random_erasing_prob=0.25",
               "data.repeated_augmentations=2", "model.stochastic_depth_prob=0.1",
               "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "optim.label_smoothing=0.1",
               "train.ema_decay=0.99", "checkpoint.keep_best_by=val_top1_ema"]


def args(tmp, epochs: int = 2) -> list[str]:
    """The fault tests' run: 2 workers, 8 steps per epoch, every regularizer on."""
    return [*common(tmp, epochs=epochs), *REGULARIZED]


@pytest.fixture(scope="module")
def straight(module_tmp):
    """The reference: the same run, never interrupted."""
    tmp = module_tmp
    code, output, result = run_job(["--name", "straight", "--storage", str(tmp / "runs"),
                                    *args(tmp)])
    assert code == 0, output[-4000:]
    return tmp, result


@pytest.fixture(autouse=True)
def _copies_removed(request):
    """Each test's runs beside the reference go when it ends: ~1.1 GB of checkpoints a run."""
    yield
    if "straight" in request.fixturenames:
        tmp, _ = request.getfixturevalue("straight")
        for run in (tmp / "runs").iterdir():
            if run.is_dir() and run.name != "straight":
                shutil.rmtree(run)


def _epochs_logged(result: dict) -> list[int]:
    """The epochs of the run's val/top1 history in MLflow, in order."""
    history = MlflowClient(result["tracking_uri"]).get_metric_history(result["mlflow_run_id"],
                                                                      "val/top1")
    return sorted(metric.step for metric in history)


def _mid_epoch_checkpoint(run_dir, epoch: int, steps_done: int):
    return next(run_dir / name for name, summary in summaries(run_dir).items()
                if summary.get("epoch") == epoch and summary.get("steps_done") == steps_done)


def _resume_from_copy(tmp, name: str, source, alter=None) -> dict:
    """Run `name` whose storage holds only a copy of checkpoint `source` (altered by `alter`)."""
    copy = tmp / "runs" / name / source.name
    shutil.copytree(source, copy)
    if alter is not None:
        state = load_checkpoint(copy)
        alter(state)
        shutil.rmtree(copy)
        save_checkpoint(copy, state, summary={"epoch": state["epoch"],
                                              "steps_done": state["steps_done"]})
    code, output, result = run_job(["--name", name, "--storage", str(tmp / "runs"), *args(tmp)])
    assert code == 0, output[-4000:]
    assert f"resumed from {copy}" in output, output[-4000:]
    return result


def _kill_a_worker_after_the_first_mid_epoch_checkpoint(tmp, runs) -> str:
    """Run `killed` with a worker SIGKILLed from outside once a mid-epoch checkpoint landed;
    return the job's output."""
    job = start_job(["--name", "killed", "--storage", str(runs), *args(tmp)],
                    runs.parent / "job.log")
    try:
        wait_until(lambda: any(0 < s.get("steps_done", 0) < STEPS_PER_EPOCH
                               for s in summaries(runs / "killed").values()), job, 600,
                   "the first mid-epoch checkpoint")
        pids = train_worker_pids(job)
        assert pids, "no Ray Train worker process found under the job"
        os.kill(pids[-1], signal.SIGKILL)
        code = job.wait(timeout=900)
    finally:
        if job.poll() is None:
            kill_job(job)
    output = (runs.parent / "job.log").read_text()
    assert code == 0, output[-6000:]
    assert "resumed from" in output, "the kill caused no restart: the test proved nothing"
    resumed_line = next(line for line in output.splitlines() if "resumed from" in line)
    assert "steps done" in resumed_line and f", {STEPS_PER_EPOCH} steps done" not in resumed_line, \
        f"expected a mid-epoch resume, got: {resumed_line}"
    return output


def test_sigkilled_worker_resumes_mid_epoch_to_identical_weights(straight, tmp_path):
    tmp, reference = straight
    output = _kill_a_worker_after_the_first_mid_epoch_checkpoint(tmp, tmp_path / "runs")
    result = result_of(output)
    assert fingerprint(result["checkpoint"]) == fingerprint(reference["checkpoint"])
    assert fingerprint(result["best_checkpoint"]) == fingerprint(reference["best_checkpoint"])
    assert _epochs_logged(result) == [0, 1]  # each epoch once in MLflow, failure or not


def _same(a, b) -> bool:
    """Deep equality of two loaded checkpoint states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_rewriting_a_checkpoint_unaltered_keeps_every_tensor_and_counter(straight, tmp_path):
    """The positive control of the two negative ones below: their rewrite of a checkpoint
    (load, alter, save) changes nothing by itself, so what changes the weights is the alteration.
    (The corrupt-checkpoint test is the positive control of resuming a copied run exactly.)"""
    tmp, _ = straight
    source = _mid_epoch_checkpoint(tmp / "runs" / "straight", epoch=1, steps_done=3)
    state = load_checkpoint(source)
    save_checkpoint(tmp_path / "rewritten", state, summary={"epoch": 1, "steps_done": 3})
    assert _same(load_checkpoint(tmp_path / "rewritten"), load_checkpoint(source))
    state["steps_done"] += 1  # and the comparison sees a one-counter difference
    assert not _same(state, load_checkpoint(source))


def test_negative_control_resuming_one_batch_off_changes_the_weights(straight):
    tmp, reference = straight
    source = _mid_epoch_checkpoint(tmp / "runs" / "straight", epoch=1, steps_done=3)

    def one_batch_off(state):
        state["steps_done"] += 1
    result = _resume_from_copy(tmp, "copy-off-by-one", source, one_batch_off)
    assert fingerprint(result["checkpoint"]) != fingerprint(reference["checkpoint"])


def test_negative_control_resuming_without_optimizer_and_rng_state_changes_the_weights(straight):
    tmp, reference = straight
    source = _mid_epoch_checkpoint(tmp / "runs" / "straight", epoch=1, steps_done=3)

    def forget_optimizer_and_rng(state):
        state["optimizer"]["state"] = {}  # momentum buffers gone, as if never saved
        torch.manual_seed(12345)
        fresh = {**state["rng"][0], "torch": torch.get_rng_state()}
        state["rng"] = [fresh for _ in state["rng"]]
    result = _resume_from_copy(tmp, "copy-no-optimizer", source, forget_optimizer_and_rng)
    assert fingerprint(result["checkpoint"]) != fingerprint(reference["checkpoint"])


def test_fingerprint_tells_different_states_apart(straight):
    """Negative control: the reference run's own earlier checkpoint must not compare equal."""
    tmp, reference = straight
    checkpoints = sorted((tmp / "runs" / "straight").glob("checkpoint_2*"))
    assert len(checkpoints) >= 2
    assert fingerprint(str(checkpoints[-2])) != fingerprint(reference["checkpoint"])


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(straight):
    """A copy of the reference run with its newest checkpoint torn: the run resumes from the one
    before and, on the same data and schedule, ends bit-identical to the reference."""
    tmp, reference = straight
    run_dir = tmp / "runs" / "corrupt"
    shutil.copytree(tmp / "runs" / "straight", run_dir)  # the shared reference stays intact
    (run_dir / "checkpoint_manager_snapshot.json").unlink()  # it names the original's folders
    newest, previous = sorted(run_dir.glob("checkpoint_2*"))[-1:-3:-1]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn upload
    code, output, result = run_job(["--name", "corrupt", "--storage", str(tmp / "runs"),
                                    *args(tmp)])
    assert code == 0, output[-4000:]
    assert f"skipping checkpoint {newest}" in output and "truncated" in output
    before = summaries(tmp / "runs" / "straight")[previous.name]  # epoch 1, 6 steps: mid-epoch
    assert (f"resumed from {previous} (epoch {before['epoch']}, {before['steps_done']} steps "
            "done, saved by 2 workers, now 2)") in output, output[-4000:]
    assert fingerprint(result["checkpoint"]) == fingerprint(reference["checkpoint"])


def test_killed_driver_resubmitted_continues_the_run_and_its_mlflow_run(tmp_path):
    run = ["--name", "driver", "--storage", str(tmp_path / "runs"), *args(tmp_path, epochs=3)]
    job = start_job(run, tmp_path / "first.log")
    try:
        wait_until(lambda: summaries(tmp_path / "runs" / "driver"), job, 600,
                   "the first checkpoint", every_s=0.5)
    finally:
        kill_job(job)  # the driver and the local Ray it started
    first = (tmp_path / "first.log").read_text()
    run_id = first.split("MLflow run ", 1)[1].split()[0]
    code, output, result = run_job(run)
    assert code == 0, output[-4000:]
    assert "resumed from" in output and "(resumed)" in output and result["epochs"] == 3, \
        output[-6000:]
    assert result["mlflow_run_id"] == run_id and _epochs_logged(result) == [0, 1, 2]
    experiment = MlflowClient(result["tracking_uri"]).get_experiment_by_name("rn50-demo")
    assert len(MlflowClient(result["tracking_uri"]).search_runs([experiment.experiment_id])) == 1


def test_failed_train_controller_is_restarted_by_the_driver_to_identical_weights(straight,
                                                                              tmp_path):
    """The controller writes its snapshot to storage after each checkpoint; when that write
    fails it raises ControllerError to the driver, which waits for storage and fits again."""
    tmp, reference = straight
    run_dir = tmp_path / "runs" / "controller"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    log_path = tmp_path / "job.log"
    job = start_job(["--name", "controller", "--storage", str(tmp_path / "runs"), *args(tmp)],
                    log_path)
    try:
        wait_until(snapshot.is_file, job, 600, "the controller's first snapshot")
        snapshot.unlink()
        snapshot.mkdir()  # the next snapshot write fails: "Is a directory"
        wait_until(lambda: "Train controller failed" in log_path.read_text(), job, 600,
                   "the driver to see the ControllerError")
        snapshot.rmdir()  # storage is healthy again
        code = job.wait(timeout=900)
    finally:
        if job.poll() is None:
            kill_job(job)
    output = log_path.read_text()
    assert code == 0, output[-6000:]
    assert "resumed from" in output, output[-6000:]
    assert fingerprint(result_of(output)["checkpoint"]) == fingerprint(reference["checkpoint"])
