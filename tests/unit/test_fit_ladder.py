"""The driver's retry ladder (rn50/distributed/fit_ladder.py): every transition, without Ray. The
same ladder inside `fit_run`, around a stand-in trainer: tests/unit/test_capacity.py."""
import pytest

from rn50.distributed.fit_ladder import Action, Decision, Outcome, RetryLadder
from rn50.records import StopReason


@pytest.mark.parametrize("outcome, decision", [
    (Outcome.FINISHED, Decision(Action.DONE, StopReason.FINISHED)),
    (Outcome.NO_RESOURCES, Decision(Action.GIVE_UP, StopReason.NO_RESOURCES)),
    (Outcome.PERMANENT, Decision(Action.GIVE_UP, StopReason.PERMANENT_ERROR)),
    (Outcome.WORKERS, Decision(Action.GIVE_UP, StopReason.GAVE_UP)),
])
def test_outcomes_that_end_the_run_whatever_came_before(outcome, decision):
    """Red if a start that found no room, an error no restart fixes, or Ray's own restarts used
    up were fitted again (each try costs minutes on a cluster), even after resumed deaths."""
    ladder = RetryLadder(max_failures=3, progress="c1")
    assert ladder.after(Outcome.CONTROLLER, "c1").action is Action.RESUME
    assert ladder.after(outcome) == decision


def test_controller_deaths_in_a_row_without_progress_end_the_run():
    ladder = RetryLadder(max_failures=2, progress="c1")
    assert ladder.after(Outcome.CONTROLLER, "c1") == Decision(Action.RESUME)
    assert ladder.after(Outcome.CONTROLLER, "c1") == Decision(Action.RESUME)
    assert ladder.after(Outcome.CONTROLLER, "c1") == Decision(Action.GIVE_UP, StopReason.GAVE_UP)
    assert ladder.failures_in_a_row == 3


def test_a_new_checkpoint_between_deaths_resets_the_count():
    """Red if a week-long run were limited to `max_failures` controller deaths in its life."""
    ladder = RetryLadder(max_failures=1, progress=None)
    for newest in ("c1", "c2", "c3", "c4"):  # a checkpoint landed before each death
        assert ladder.after(Outcome.CONTROLLER, newest).action is Action.RESUME
        assert (ladder.failures_in_a_row, ladder.progress) == (1, newest)
    assert ladder.after(Outcome.CONTROLLER, "c4").action is Action.GIVE_UP


def test_storage_that_cannot_say_counts_as_no_progress():
    ladder = RetryLadder(max_failures=1, progress=None)
    assert ladder.after(Outcome.CONTROLLER, None).action is Action.RESUME
    assert ladder.after(Outcome.CONTROLLER, None).action is Action.GIVE_UP
