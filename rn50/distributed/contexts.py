"""The typed objects that cross the Ray boundary: what a driver hands its workers and trials."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from rn50.config import Config
from rn50.io import storage
from rn50.io.pricing import CostBasis
from rn50.io.tracking import Tracker


@dataclass(frozen=True)
class RunContext:
    """What the driver of one training run hands every one of its Ray Train workers."""
    config: Config
    """The resolved, validated configuration of the run."""
    tracking_uri: str
    """MLflow tracking URI the workers log to."""
    mlflow_run_id: str
    """The MLflow run this training run logs into (rank 0 writes metrics and tags)."""
    cost: CostBasis | None = None
    """What rank 0 prices the run's nodes with for `train.budget_usd`; None: no budget check
    (sweep trials)."""

    @cached_property
    def tracker(self) -> Tracker:
        """The run's MLflow tracker (one client per process that uses it)."""
        return Tracker(self.tracking_uri, self.mlflow_run_id)


@dataclass(frozen=True)
class SweepContext:
    """What the sweep driver hands every trial it starts."""
    name: str
    """Sweep name; with `storage_uri` it identifies the sweep (a rerun resumes it)."""
    storage_uri: str
    """Local folder or s3:// URI holding the sweep's state and its trials' checkpoints."""
    overrides: tuple[str, ...]
    """Dotted overrides applied to every trial's config (after the sweep's own)."""
    tracking_uri: str
    """MLflow tracking URI of the parent and child runs."""
    parent_run_id: str
    """The sweep's MLflow parent run; trials log into child runs of it."""
    epochs: int
    """Epochs of a full trial (ASHA's max_t)."""

    @property
    def run_key(self) -> str:
        """The sweep's key in storage and MLflow (`storage.run_uri`)."""
        return storage.run_uri(self.storage_uri, self.name)

    def trial_key(self, trial_id: str) -> str:
        """The MLflow key of one trial's child run."""
        return storage.join(self.run_key, trial_id)

    @property
    def trials_storage(self) -> str:
        """Where the trials' Ray Train runs keep their checkpoints."""
        return storage.join(self.storage_uri, self.name, "trials")
