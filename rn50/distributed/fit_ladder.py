"""What the driver does after each `fit()` ends: a small state machine over rn50's own outcomes.

`fit_run` (driver.py) calls `fit()`, has Ray's exception translated into an `Outcome`
(rn50.distributed.ray_errors.classify) and asks the ladder what comes next:

    outcome        decision                        why
    FINISHED       DONE                            the run ended (finished or on its budget)
    NO_RESOURCES   GIVE_UP (NO_RESOURCES)          the start policy found no room: exit code 4
    PERMANENT      GIVE_UP (PERMANENT_ERROR)       no restart fixes it: the error's exit code
    WORKERS        GIVE_UP (GAVE_UP)               Ray's own restarts (failures, preemptions)
                                                   are used up
    CONTROLLER     RESUME, or GIVE_UP (GAVE_UP)    the Train controller died (a storage outage
                   after `max_failures` in a row   kills it): fit again from the newest
                   without progress                checkpoint; any new checkpoint resets the count

No Ray here: the ladder is plain Python, tested on its own (tests/unit/test_fit_ladder.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from rn50.records import StopReason


class Outcome(str, Enum):
    """How one `fit()` ended, in the project's terms."""
    FINISHED = "finished"
    NO_RESOURCES = "no_resources"
    PERMANENT = "permanent"
    WORKERS = "workers"
    CONTROLLER = "controller"


class Action(Enum):
    """What the driver does next."""
    DONE = "done"
    """Return the run's result."""
    RESUME = "resume"
    """Wait for storage, then `fit()` again (Ray resumes from the newest checkpoint)."""
    GIVE_UP = "give_up"
    """Raise, with the error the decision's reason names."""


@dataclass(frozen=True)
class Decision:
    """The ladder's answer to one outcome."""
    action: Action
    reason: StopReason | None = None
    """Why the run ends (None while it goes on)."""


_ENDS = {Outcome.FINISHED: Decision(Action.DONE, StopReason.FINISHED),
         Outcome.NO_RESOURCES: Decision(Action.GIVE_UP, StopReason.NO_RESOURCES),
         Outcome.PERMANENT: Decision(Action.GIVE_UP, StopReason.PERMANENT_ERROR),
         Outcome.WORKERS: Decision(Action.GIVE_UP, StopReason.GAVE_UP)}
"""Outcomes whose decision depends on nothing but themselves."""


@dataclass
class RetryLadder:
    """The driver's state across the `fit()` calls of one run."""
    max_failures: int
    """`checkpoint.max_failures`: controller deaths in a row without progress that are resumed."""
    progress: str | None = None
    """The run's newest checkpoint when the last `fit()` started (None: none yet, or unknown)."""
    failures_in_a_row: int = 0
    """Controller deaths since the last one after which the run had a new checkpoint."""

    def after(self, outcome: Outcome, progress_now: str | None = None) -> Decision:
        """The decision after a `fit()` that ended with `outcome`; `progress_now` is the run's
        newest checkpoint after it (read once storage answers again)."""
        if outcome in _ENDS:
            return _ENDS[outcome]
        # A controller death: a week-long run may see many; only those in a row without a new
        # checkpoint between them count, so a storage that never comes back still ends the run.
        self.failures_in_a_row = 1 if progress_now != self.progress else self.failures_in_a_row + 1
        self.progress = progress_now
        if self.failures_in_a_row > self.max_failures:
            return Decision(Action.GIVE_UP, StopReason.GAVE_UP)
        return Decision(Action.RESUME)
