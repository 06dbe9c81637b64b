"""What a training run says about itself while it runs: a console without Ray Train's chatter,
the ETA on each epoch line, per-step metrics in MLflow, and each node's system metrics (MLflow's
own sampler)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable

import ray
import ray.train

from rn50.distributed.contexts import RunContext

logger = logging.getLogger(__name__)


def quiet_ray_console(level: str) -> None:
    """Keep Ray's own messages below `level` off this worker's console (Ray's log files keep
    them). `RunConfig(logging_config=...)` covers loggers named `ray.train.*`; the per-report
    and per-checkpoint lines come from loggers named by file path, so this filter goes by where
    a record was logged from."""
    ray_dir = os.path.dirname(ray.__file__) + os.sep
    threshold = logging.getLevelName(level)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= threshold or not record.pathname.startswith(ray_dir)
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PlainRayHandler":  # Ray Train's console handler
            handler.addFilter(keep)


class EpochClock:
    """Time left, from the mean wall time of the epochs this worker has run."""

    def __init__(self, epochs_left: int):
        self.epochs_left, self.start, self.done = epochs_left, time.monotonic(), 0

    def epoch_done(self) -> str:
        """' | 41 s/epoch, eta 3m25s', said when an epoch has finished."""
        self.done += 1
        per_epoch_s = (time.monotonic() - self.start) / self.done
        left_s = per_epoch_s * (self.epochs_left - self.done)
        return f" | {per_epoch_s:.0f} s/epoch, eta {_duration(left_s)}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@contextlib.contextmanager
def system_metrics(run: RunContext):
    """MLflow's own system-metrics sampler on this node (the first worker of each node runs it),
    logging to the training run under system/node-<Ray node id>/..."""
    interval_s = run.config.tracking.system_metrics_interval_s
    if not interval_s or ray.train.get_context().get_local_rank() != 0:
        yield
        return
    node = "node-" + ray.get_runtime_context().get_node_id()[:8]
    with run.tracker.system_metrics(interval_s, node):
        yield


def step_metrics_logger(run: RunContext) -> Callable[[int, dict], None]:
    """Per-step metrics to MLflow at the global step; a tracking outage costs a warning, not the
    run (the per-epoch metrics are the record that must land)."""
    warned = False

    def log_step(global_step: int, metrics: dict) -> None:
        nonlocal warned
        try:
            run.tracker.log_metrics(metrics, step=global_step)
        except Exception as err:  # noqa: BLE001 - any tracking failure
            if not warned:
                logger.warning("per-step metrics not logged to MLflow (%s); training goes on", err)
                warned = True
    return log_step
