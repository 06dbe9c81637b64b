"""The fault matrix on real processes: a SIGKILLed worker and a Train controller that fails (in
one run), altered checkpoints. (A killed driver resubmitted and a torn checkpoint are two of the
chaos test's three faults, test_chaos.py, on the same bit-exact terms.)

Composer-style: a run interrupted and resumed must end with weights bit-identical to the same run
left alone, compared by the SHA-256 fingerprint of every tensor (`python -m rn50.checkpoint`).
Every fault comes from outside the product: a process killed by pid, files changed in storage.
The negative control shows the comparison can fail: a resume one batch off must end with
different weights. (A resume without the optimizer and RNG state is the same control one level
down, tests/unit/test_mixing.py: a whole job for it cost a minute of the suite.)
"""
import os
import shutil
import signal

import pytest
import torch

from rn50.io.checkpoints import load_checkpoint, save_checkpoint
from tests.integration.faults import (STEPS_PER_EPOCH, common, fingerprint, kill_job, result_of,
                                      start_job, summaries, train_worker_pids, wait_until)
from tests.integration.jobs import epochs_logged, run_job


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


def _replace_by_a_directory(snapshot) -> bool:
    """Replace the controller's snapshot file by a directory; False while there is none (Ray
    writes it anew after each checkpoint)."""
    try:
        snapshot.unlink()
    except FileNotFoundError:
        return False
    snapshot.mkdir()
    return True


def test_a_killed_worker_and_a_failed_controller_resume_to_identical_weights(straight,
                                                                            tmp_path):
    """Two faults in one run. A worker SIGKILLed once the first mid-epoch checkpoint landed:
    Ray Train restarts the group, which resumes mid-epoch. Then the controller's next snapshot
    write to storage fails (the file replaced by a directory): it raises ControllerError to the
    driver, which waits for storage and fits again. The run must end bit-identical to the
    straight one, each epoch logged once."""
    tmp, reference = straight
    runs, log_path = tmp_path / "runs", tmp_path / "job.log"
    snapshot = runs / "killed" / "checkpoint_manager_snapshot.json"
    job = start_job(["--name", "killed", "--storage", str(runs), *args(tmp)], log_path)
    try:
        wait_until(lambda: any(0 < s.get("steps_done", 0) < STEPS_PER_EPOCH
                               for s in summaries(runs / "killed").values()), job, 600,
                   "the first mid-epoch checkpoint")
        pids = train_worker_pids(job)
        assert pids, "no Ray Train worker process found under the job"
        os.kill(pids[-1], signal.SIGKILL)
        wait_until(lambda: "resumed from" in log_path.read_text(), job, 600, "the group's restart")
        wait_until(lambda: _replace_by_a_directory(snapshot), job, 600,
                   "the controller's snapshot")  # its next write fails: "Is a directory"
        wait_until(lambda: "Train controller failed" in log_path.read_text(), job, 600,
                   "the driver to see the ControllerError")
        snapshot.rmdir()  # storage is healthy again
        code = job.wait(timeout=900)
    finally:
        if job.poll() is None:
            kill_job(job)
    output = log_path.read_text()
    assert code == 0, output[-6000:]
    resumes = list(dict.fromkeys(line.split("resumed from ", 1)[1] for line in output.splitlines()
                                 if "resumed from" in line))
    assert len(resumes) >= 2, f"each fault must have caused a resume: {resumes}"
    assert "steps done" in resumes[0] and f", {STEPS_PER_EPOCH} steps done" not in resumes[0], \
        f"expected a mid-epoch resume first, got: {resumes[0]}"
    result = result_of(output)
    assert fingerprint(result["checkpoint"]) == fingerprint(reference["checkpoint"])
    assert fingerprint(result["best_checkpoint"]) == fingerprint(reference["best_checkpoint"])
    assert epochs_logged(result) == [0, 1]  # each epoch once in MLflow, failures or not


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
    """The positive control of the negative one below: its rewrite of a checkpoint
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


def test_fingerprint_tells_different_states_apart(straight):
    """Negative control: the reference run's own earlier checkpoint must not compare equal."""
    tmp, reference = straight
    checkpoints = sorted((tmp / "runs" / "straight").glob("checkpoint_2*"))
    assert len(checkpoints) >= 2
    assert fingerprint(str(checkpoints[-2])) != fingerprint(reference["checkpoint"])
