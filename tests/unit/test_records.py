"""The typed records that come back across the Ray boundary (rn50/records.py): one naming map for
Ray, MLflow and the manifest; a checkpoint's format version (old loads, newer refused); the stop
reason the worker sets and the driver reads; Tune's keys read with a check."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rn50.config import load_config
from rn50.io.checkpoints import CheckpointError, load_checkpoint, load_newest_good, save_checkpoint
from rn50.core.training_state import TrainingState
from rn50.records import (STATE_FORMAT_VERSION, STATE_VERSION_KEY, CheckpointExtras,
                          CheckpointFormatError, EpochReport, RecordError, RunSummary, StopReason,
                          TrialResult)


def _report(**changes) -> EpochReport:
    fields = dict(epoch=2, train_loss=1.5, val_top1=41.0, val_top5=80.0, val_loss=2.0, lr=0.1,
                  images_per_s=300.0, skipped_images=0, train_crop_px=32)
    return EpochReport(**{**fields, **changes})


def test_one_naming_map_for_ray_mlflow_and_the_manifest():
    """Red if a metric reached MLflow under its Ray name (or the reverse), or if the epoch or the
    stop reason (a string) were logged as MLflow metrics."""
    report = _report(val_top1_ema=40.0, stop_reason="finished")
    assert report.mlflow_metrics() == {
        "train/epoch_loss": 1.5, "val/top1": 41.0, "val/top5": 80.0, "val/loss": 2.0,
        "epoch/lr": 0.1, "epoch/images_per_s": 300.0, "skipped_images": 0, "train_crop_px": 32,
        "val/top1_ema": 40.0}
    assert report.metrics()["stop_reason"] == "finished" and report.metrics()["epoch"] == 2
    assert "val_top1_ema" not in _report().metrics()  # unset: not reported, as before
    assert "stop_reason" not in _report().metrics()  # only the run's last report carries one
    names = [f.metadata["mlflow"] for f in dataclasses.fields(EpochReport)
             if f.metadata["mlflow"]]
    assert len(names) == len(set(names))


def test_a_report_comes_back_from_ray_and_tune_dicts():
    report = _report(stop_reason="budget")
    tune_result = {**report.metrics(), "trial_id": "abc_00001", "training_iteration": 3}
    assert EpochReport.from_metrics(tune_result) == report
    with pytest.raises(RecordError, match="not an epoch report.*train_loss"):
        EpochReport.from_metrics({"epoch": 0, "steps_done": 5, "reason": "preemption"})


def test_the_stop_reason_is_read_not_inferred_from_the_epoch_count():
    """The worker's reason is what the driver reads: a budget stop on what would be the last
    epoch by the count is still a budget stop, and a finished run of fewer epochs than the config
    says (it changed between starts) is still finished. Only a report from before the reason was
    recorded falls back to the count."""
    assert _report(epoch=3, stop_reason="budget").stop(epochs=4) is StopReason.BUDGET
    assert _report(epoch=1, stop_reason="finished").stop(epochs=4) is StopReason.FINISHED
    assert _report(epoch=1).stop(epochs=4) is StopReason.BUDGET
    assert _report(epoch=3).stop(epochs=4) is StopReason.FINISHED


def _ray_result(report: EpochReport, checkpoint_path: str):
    """What the driver reads from Ray's final Result: the last checkpoint's metrics and path."""
    return SimpleNamespace(metrics=report.metrics(), checkpoint=SimpleNamespace(
        path=checkpoint_path))


@pytest.mark.parametrize("reason", [StopReason.BUDGET, StopReason.FINISHED])
def test_the_driver_reads_the_workers_stop_reason_into_the_result_line(tmp_path, reason):
    from rn50.distributed.driver import run_summary
    config = load_config("demo", ["train.epochs=4", "train.budget_usd=2",
                                  "checkpoint.keep_best_by=none"])
    final = str(tmp_path / "runs" / "r" / "checkpoint_2026-01-01_00-00-00.000000")
    summary = run_summary(_ray_result(_report(epoch=1, stop_reason=reason.value), final),
                          config, "r", str(tmp_path / "runs"), ("sqlite:///m.db", "run-1"),
                          cost_usd=1.23456, wall_s=12.34)
    assert summary.stopped is reason
    line = summary.to_dict()
    assert (line["epochs"], line["val_top1"], line["checkpoint"]) == (2, 41.0, final)
    assert (line["cost_usd"], line["wall_s"], line["mlflow_run_id"]) == (1.2346, 12.3, "run-1")
    if reason is StopReason.BUDGET:
        assert (line["stopped"], line["budget_usd"]) == ("budget", 2)
    else:
        assert "stopped" not in line and "budget_usd" not in line


def test_the_result_line_takes_only_absolute_paths_or_uris():
    common = dict(name="r", last=_report(), stopped=StopReason.FINISHED, mlflow_run_id="x",
                  tracking_uri="t", cost_usd=0.0, wall_s=1.0)
    RunSummary(checkpoint="s3://b/runs/r/checkpoint_1", **common)
    RunSummary(checkpoint="/abs/runs/r/checkpoint_1",
               best={"best_checkpoint": "/abs/runs/r/best/checkpoint_1"}, **common)
    with pytest.raises(RecordError, match="neither absolute nor a URI"):
        RunSummary(checkpoint="runs/r/checkpoint_1", **common)
    with pytest.raises(RecordError, match="neither absolute nor a URI"):
        RunSummary(checkpoint="/abs/c", best={"best_checkpoint": "./runs/r/best/c"}, **common)


def _training() -> TrainingState:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainingState(model, optimizer,
                         torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))


def test_a_new_checkpoint_records_its_format_and_its_extras(tmp_path):
    extras = CheckpointExtras(samples_done=64, world_size=2, class_names=["a", "b"],
                              best_value=41.0)
    state = _training().snapshot(0, 1, 3, {}, extras)
    assert state[STATE_VERSION_KEY] == STATE_FORMAT_VERSION
    assert "spent_usd" not in state  # the cost only where it is known (rank 0 with a basis)
    save_checkpoint(tmp_path / "c", state, {"epoch": 1})
    loaded = load_checkpoint(tmp_path / "c")
    assert CheckpointExtras.from_state(loaded) == extras
    assert CheckpointExtras.from_state(loaded).describe(loaded["steps_done"]) == \
        "3 steps done, saved by 2 workers"


def test_an_old_checkpoint_without_a_version_still_loads_and_resumes(tmp_path):
    source = _training()
    state = source.state_dict(1, 3, {})
    for key in (STATE_VERSION_KEY, "samples_done", "world_size", "class_names"):
        state.pop(key, None)  # what checkpoints saved before these fields hold
    save_checkpoint(tmp_path / "old", state, {"epoch": 1})
    loaded = load_checkpoint(tmp_path / "old")
    assert _training().restore(loaded, steps_per_epoch=3) == (2, 0)
    extras = CheckpointExtras.from_state(loaded)
    assert extras.world_size is None and extras.describe(None) == "? steps done, saved by ? workers"


def test_a_checkpoint_from_a_newer_format_is_refused_with_what_to_do(tmp_path):
    """Red if a newer state were misread, or skipped for an older checkpoint as if broken
    (resume would silently go back in the run)."""
    older = tmp_path / "run" / "checkpoint_2026-01-01_00-00-01.000000"
    newer = tmp_path / "run" / "checkpoint_2026-01-01_00-00-02.000000"
    save_checkpoint(older, _training().state_dict(0, 3, {}), {"epoch": 0})
    save_checkpoint(newer, {**_training().state_dict(1, 3, {}),
                            STATE_VERSION_KEY: STATE_FORMAT_VERSION + 1}, {"epoch": 1})
    with pytest.raises(CheckpointFormatError, match="upgrade rn50.*or start a fresh run") as raised:
        load_checkpoint(newer)
    assert raised.value.exit_code == 2 and not isinstance(raised.value, CheckpointError)
    with pytest.raises(CheckpointFormatError):
        load_newest_good(str(tmp_path / "run"))
    training = _training()
    before = training.model.weight.clone()
    with pytest.raises(CheckpointFormatError):
        training.restore({**_training().state_dict(1, 3, {}),
                          STATE_VERSION_KEY: STATE_FORMAT_VERSION + 1}, steps_per_epoch=3)
    assert torch.equal(training.model.weight, before), "nothing is loaded from a refused state"


def test_tunes_keys_are_read_through_a_checked_record():
    """Red if Ray renamed the keys Tune and its Train callback add, or a result without Tune's
    trial id were read as trial '?'."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
    from ray.tune.result import TRIAL_ID

    from rn50.records import TUNE_CHECKPOINT_KEY, TUNE_TRIAL_ID_KEY
    assert (TUNE_TRIAL_ID_KEY, TUNE_CHECKPOINT_KEY) == (TRIAL_ID, CHECKPOINT_PATH_KEY)
    trial = TrialResult.from_tune({**_report().metrics(), TRIAL_ID: "t_00001",
                                   CHECKPOINT_PATH_KEY: "bucket/s/trials/checkpoint_1"})
    assert (trial.trial_id, trial.checkpoint_path, trial.report) == (
        "t_00001", "bucket/s/trials/checkpoint_1", _report())
    mid_epoch = TrialResult.from_tune({"epoch": 0, "steps_done": 4, TRIAL_ID: "t_00002"})
    assert (mid_epoch.checkpoint_path, mid_epoch.report) == ("", None)
    with pytest.raises(RecordError, match="without 'trial_id'"):
        TrialResult.from_tune(_report().metrics())
