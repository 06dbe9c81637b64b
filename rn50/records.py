"""The typed records that come back across the Ray boundary (what goes in: distributed/contexts.py).

Read in the order a run produces them:
- `EpochReport`: what every worker reports at an epoch end. Its field names are the keys of Ray's
  report, of Tune's results and of the checkpoint manifest's summary; each field's `mlflow`
  metadata is its MLflow metric name: the one naming map.
- `CheckpointExtras`: what a checkpoint's state holds beside the training objects, and the state's
  format version (`check_state_version`: an old state loads, a newer one is refused).
- `RunSummary`: the run's end, with the reason it stopped (`StopReason`), as the driver reads it
  from Ray's final result; its `to_dict()` is the RESULT line.
- `TrialResult`: one Tune result of a sweep trial, with the keys Ray's Tune callback adds.

Plain dataclasses with no imports from the rest of rn50 but its errors, so every layer can use them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from rn50.errors import PermanentError


class RecordError(ValueError):
    """A record read back from Ray, Tune or a checkpoint lacks a field it must have."""


class StopReason(str, Enum):
    """Why a run (one `fit_run`) ended; the first two end with a RESULT line, the rest raise."""
    FINISHED = "finished"
    """Every epoch of `train.epochs` ran."""
    BUDGET = "budget"
    """Rank 0 stopped after an epoch: the next would pass `train.budget_usd` (exit code 5)."""
    NO_RESOURCES = "no_resources"
    """The workers' start gave up: no room and no node on its way (exit code 4)."""
    PERMANENT_ERROR = "permanent_error"
    """A worker hit an error no restart fixes (its own exit code)."""
    GAVE_UP = "gave_up"
    """Ray's restarts (failures or preemptions) or the driver's resumes were used up."""


def _metric(mlflow_name: str | None, **kwargs) -> Any:
    """A report field and its MLflow metric name (None: not an MLflow metric)."""
    return field(metadata={"mlflow": mlflow_name}, **kwargs)


@dataclass(frozen=True)
class EpochReport:
    """What every worker reports at the end of an epoch (rank 0 also checkpoints with it)."""
    epoch: int = _metric(None)
    """The epoch that ended, from 0 (MLflow's step, not a metric)."""
    train_loss: float = _metric("train/epoch_loss")
    """Mean training loss over the epoch's steps."""
    val_top1: float = _metric("val/top1")
    """Validation top-1 accuracy, %."""
    val_top5: float = _metric("val/top5")
    """Validation top-5 accuracy, %."""
    val_loss: float = _metric("val/loss")
    """Mean validation loss."""
    lr: float = _metric("epoch/lr")
    """The learning rate at the epoch's start (per step: the engine's `lr`)."""
    images_per_s: float = _metric("epoch/images_per_s")
    """Training throughput over the epoch, all workers."""
    skipped_images: int = _metric("skipped_images")
    """Images the loader skipped as unreadable."""
    train_crop_px: int = _metric("train_crop_px")
    """The training crop of the epoch (progressive resizing)."""
    val_top1_ema: float | None = _metric("val/top1_ema", default=None)
    """Validation top-1 of the EMA weights (only when the best is chosen by it)."""
    stop_reason: str = _metric(None, default="")
    """Set on the run's last report only: `StopReason.FINISHED` or `BUDGET` ("" otherwise)."""

    def metrics(self) -> dict[str, Any]:
        """Ray's report, Tune's result and the manifest summary (fields left unset are left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != ""}

    def mlflow_metrics(self) -> dict[str, float]:
        """The MLflow metrics of the epoch (logged at the epoch as step)."""
        return {f.metadata["mlflow"]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["mlflow"] and getattr(self, f.name) is not None}

    @staticmethod
    def mlflow_name(name: str) -> str:
        """The MLflow metric name of report field `name`."""
        return {f.name: f.metadata["mlflow"] for f in dataclasses.fields(EpochReport)}[name]

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None) -> "EpochReport":
        """The report back from a dict Ray or Tune hands over (extra keys, like Tune's, ignored);
        RecordError when a field it must have is missing (e.g. a mid-epoch checkpoint's)."""
        metrics = metrics or {}
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing = sorted(required - set(metrics))
        if missing:
            raise RecordError(f"not an epoch report: {missing} missing from {sorted(metrics)}")
        return cls(**{k: v for k, v in metrics.items() if k in names})

    def stop(self, epochs: int) -> StopReason:
        """Why the run ended on this report; a report from before the reason was recorded
        (an old checkpoint) ended the run early only on the budget."""
        if self.stop_reason:
            return StopReason(self.stop_reason)
        return StopReason.FINISHED if self.epoch + 1 >= epochs else StopReason.BUDGET


STATE_FORMAT_VERSION = 1
"""The layout of a checkpoint's state dict; states saved before it was recorded have the same
layout and count as 1. Raise it when a reader of an old state would misread a new one."""
STATE_VERSION_KEY = "format_version"


class CheckpointFormatError(PermanentError):
    """A checkpoint saved by a newer rn50, in a state format this one cannot read (exit code 2)."""
    exit_code = 2


def check_state_version(state: dict[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """`state` if this rn50 can read its format; CheckpointFormatError saying what to do if not."""
    version = state.get(STATE_VERSION_KEY, 1)
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where} was saved in checkpoint format {version}; this rn50 reads formats up to "
            f"{STATE_FORMAT_VERSION}: upgrade rn50 (the same version that wrote it, or newer) to "
            "resume or load it, or start a fresh run with a new --name")
    return state


SPENT_FIELDS = ("spent_usd", "spent_run_s")
"""The extras the manifest summary copies too (rn50.io.checkpoints.SPENT_KEYS)."""


@dataclass(frozen=True)
class CheckpointExtras:
    """What a checkpoint's state holds beside the training objects, epoch and steps (None: a
    checkpoint saved before the field existed)."""
    samples_done: int | None = None
    """Samples of the epoch trained (steps x global batch: the same at any world size)."""
    world_size: int | None = None
    """Workers of the run when it saved."""
    class_names: list[str] | None = None
    """Readable class names, in label order."""
    class_wnids: list[str] | None = None
    """WordNet ids of the classes (ImageNet), in label order."""
    best_value: float | None = None
    """The best `checkpoint.keep_best_by` value so far."""
    spent_usd: float | None = None
    """What the run had cost when it saved (rank 0 with a cost basis)."""
    spent_run_s: int | None = None
    """The run's seconds over all its starts when it saved."""

    def to_state(self) -> dict[str, Any]:
        """The keys this record adds to a state dict (the cost only where it is known)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in SPENT_FIELDS}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CheckpointExtras":
        """The extras of a loaded state (checked for its format version first)."""
        check_state_version(state)
        return cls(**{f.name: state.get(f.name) for f in dataclasses.fields(cls)})

    def describe(self, steps_done: int | None) -> str:
        """'12 steps done, saved by 2 workers', with '?' for what an old checkpoint lacks."""
        steps = "?" if steps_done is None else steps_done
        workers = "?" if self.world_size is None else self.world_size
        return f"{steps} steps done, saved by {workers} workers"


def _one_form(path: str) -> str:
    """`path` if it is absolute or a URI; RecordError otherwise (the RESULT line's paths must
    mean the same from any folder)."""
    if path and "://" not in path and not os.path.isabs(path):
        raise RecordError(f"{path!r} is neither absolute nor a URI: pass it through "
                          "rn50.io.storage.absolute / from_ray_path")
    return path


@dataclass(frozen=True)
class RunSummary:
    """A training run's end: the RESULT line `ray_jobs/train_full.py` prints."""
    name: str
    last: EpochReport
    """The final report (Ray's `Result.metrics`: the newest checkpoint's)."""
    stopped: StopReason
    checkpoint: str
    """The final checkpoint: absolute path or storage URI."""
    mlflow_run_id: str
    tracking_uri: str
    cost_usd: float
    wall_s: float
    budget_usd: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)
    """`best_checkpoint` (absolute or URI), `best_<metric>`, `best_epoch`; {} if none is kept."""

    def __post_init__(self):
        _one_form(self.checkpoint)
        _one_form(self.best.get("best_checkpoint", ""))

    def to_dict(self) -> dict[str, Any]:
        """The RESULT line's keys (`stopped` and `budget_usd` only on a budget stop, as before)."""
        summary = {"name": self.name, "val_top1": self.last.val_top1,
                   "val_top5": self.last.val_top5, "epochs": self.last.epoch + 1,
                   "checkpoint": self.checkpoint, **self.best,
                   "mlflow_run_id": self.mlflow_run_id, "tracking_uri": self.tracking_uri,
                   "cost_usd": self.cost_usd, "wall_s": self.wall_s}
        if self.stopped is StopReason.BUDGET:
            summary.update(stopped=self.stopped.value, budget_usd=self.budget_usd)
        return summary


TUNE_TRIAL_ID_KEY = "trial_id"
"""The key Tune adds to every result (ray.tune.result.TRIAL_ID; tests/unit/test_records.py)."""
TUNE_CHECKPOINT_KEY = "checkpoint_path"
"""The key Ray's TuneReportCallback adds to a result with a checkpoint (CHECKPOINT_PATH_KEY)."""


@dataclass(frozen=True)
class TrialResult:
    """One Tune result of a sweep trial: its id, its checkpoint (Ray's path form) if the report
    carried one, and the report itself when it was an epoch end."""
    trial_id: str
    checkpoint_path: str
    report: EpochReport | None

    @classmethod
    def from_tune(cls, metrics: dict[str, Any] | None) -> "TrialResult":
        """Read a result Tune hands back; RecordError if Tune's own trial id is not in it."""
        metrics = metrics or {}
        if not metrics.get(TUNE_TRIAL_ID_KEY):
            raise RecordError(f"a Tune result without {TUNE_TRIAL_ID_KEY!r}: {sorted(metrics)}")
        try:
            report = EpochReport.from_metrics(metrics)
        except RecordError:  # a mid-epoch checkpoint's report
            report = None
        return cls(str(metrics[TUNE_TRIAL_ID_KEY]), str(metrics.get(TUNE_CHECKPOINT_KEY) or ""),
                   report)
