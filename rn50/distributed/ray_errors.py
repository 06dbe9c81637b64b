"""Ray's exception classes, imported here and nowhere else, translated into rn50's outcomes.

Three of them live in `ray.train.v2._internal`, which may change in any Ray release:
tests/unit/test_ray_errors.py imports each by the path in `RAY_EXCEPTIONS` and checks that Ray
still raises it, so an upgrade that renames or moves one turns a unit test red, not a cluster run.
`classify` turns what `fit()` raised into a `Failure` (a `fit_ladder.Outcome` and a message); the
start policy (ray_adapter) raises `StartGaveUp` and `PermanentRunFailure` inside the controller.
"""
from __future__ import annotations

from dataclasses import dataclass

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.train.v2._internal.exceptions import (InsufficientClusterResourcesError,
                                               WorkerGroupStartupFailedError,
                                               WorkerGroupStartupTimeoutError)
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from rn50.distributed.fit_ladder import Outcome
from rn50.errors import PermanentError

RAY_EXCEPTIONS = {
    "ray.exceptions": ("ActorDiedError", "ActorUnavailableError"),
    "ray.train.v2._internal.exceptions": ("InsufficientClusterResourcesError",
                                          "WorkerGroupStartupFailedError",
                                          "WorkerGroupStartupTimeoutError"),
    "ray.train.v2.api.exceptions": ("ControllerError", "TrainingFailedError", "WorkerGroupError"),
}
"""Every Ray exception class used here, by the module it is imported from."""

__all__ = ["ControllerError", "FIT_ERRORS", "Failure", "InsufficientClusterResourcesError",
           "PermanentRunFailure", "StartGaveUp", "TrainingFailedError", "WorkerGroupError",
           "WorkerGroupStartupFailedError", "WorkerGroupStartupTimeoutError", "classify",
           "permanent_in"]


class StartGaveUp(RuntimeError):
    """A start found no room and no node on its way within its limits (exit code 4)."""


class PermanentRunFailure(RuntimeError):
    """A worker hit an error no restart can fix; carries that error's message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return (self.__class__, (str(self), self.exit_code))


@dataclass(frozen=True)
class Failure:
    """How a `fit()` that raised ended, in the project's terms."""
    kind: Outcome
    """NO_RESOURCES (exit 4), PERMANENT (the error's own exit code), WORKERS (a worker error,
    Ray's restarts used up) or CONTROLLER (the Train controller failed: storage, a bug)."""
    message: str
    exit_code: int = 1


def permanent_in(error: BaseException | None) -> PermanentRunFailure | None:
    """The first `PermanentError` among a worker group's errors, as a PermanentRunFailure."""
    if isinstance(error, WorkerGroupError):
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, PermanentError):
                return PermanentRunFailure(f"rank {rank}: {failure}", failure.exit_code)
    return None


FIT_ERRORS = (TrainingFailedError, ActorDiedError, ActorUnavailableError)
"""What `TorchTrainer.fit()` raises when a run fails: Ray Train's own error, or the Train
controller actor's when the node it ran on went away (it may run on any node)."""


def classify(error: Exception) -> Failure:
    """What `TorchTrainer.fit()` raised (one of `FIT_ERRORS`), as a `Failure`."""
    if isinstance(error, (ActorDiedError, ActorUnavailableError)):
        # The run is still in storage: it resumes as after a ControllerError.
        return Failure(Outcome.CONTROLLER, f"its node went away: {type(error).__name__}")
    cause = error.controller_failure if isinstance(error, ControllerError) else error
    if isinstance(cause, StartGaveUp):
        return Failure(Outcome.NO_RESOURCES, str(cause), 4)
    if isinstance(cause, InsufficientClusterResourcesError):
        return Failure(Outcome.NO_RESOURCES, str(cause).splitlines()[0], 4)
    permanent = cause if isinstance(cause, PermanentRunFailure) else permanent_in(cause)
    if permanent is not None:
        return Failure(Outcome.PERMANENT, str(permanent), permanent.exit_code)
    if isinstance(error, ControllerError):
        return Failure(Outcome.CONTROLLER,
                       str(cause).splitlines()[0] if str(cause) else repr(cause))
    return Failure(Outcome.WORKERS, str(error).splitlines()[0])
