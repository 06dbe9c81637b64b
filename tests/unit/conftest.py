"""The unit tests run beside the integration tests (tests/conftest.py): at a lower CPU priority,
so they take what the integration tests leave idle and barely slow the ones timed by a deadline
(a nice of 10 weighs ~1/10 of a normal process when both want a core; 19 would starve the unit
tests' own few-second timeouts while a training run holds both cores)."""
import os

import pytest

UNIT_NICENESS = 10


@pytest.fixture(scope="session", autouse=True)
def _beside_the_integration_tests():
    """Lower this process's CPU priority (and its children's) when it shares the machine."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.nice(max(0, UNIT_NICENESS - os.nice(0)))
    yield
