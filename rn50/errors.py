"""The errors a run can end with that no restart of its workers can fix, and their exit codes.

Ray Train restarts a worker group after any worker error, up to `checkpoint.max_failures` times;
on a GPU cluster each restart costs minutes. A `PermanentError` raised in a worker (a wrong
`data.root`, a GPU torch cannot see) ends the run at once instead: the distributed layer's start
policy looks for it among the workers' errors (`rn50.distributed.ray_adapter`).
"""
from __future__ import annotations


class PermanentError(Exception):
    """An error that the same run, restarted, would hit again; the message says what to fix."""
    exit_code = 1
    """What `ray_jobs/train_full.py` exits with when a run ends on it."""


class DeviceError(PermanentError, RuntimeError):
    """A worker asked for a GPU (`scaling.use_gpu`) and torch cannot use one on its node."""
    exit_code = 6
