"""The unit tests run beside the integration tests (tests/conftest.py): at a lower CPU priority,
so they take what the integration tests leave idle and barely slow the ones timed by a deadline
(a nice of 10 weighs ~1/10 of a normal process when both want a core, Ray's training workers
included: the suite runs them at nice 0, tests/conftest.py; 19 would starve the unit
tests' own few-second timeouts while a training run holds both cores); and without Ray: a call
that would start a local Ray on its own (Ray's auto-init) raises instead. Such a Ray, left up in
this process for the session, is a second Ray instance on the machine beside the integration
tests' clusters, and Ray Train's placement-group cleaner then fails ("multiple active Ray
instances"): a sweep's finished trials kept their CPUs and the next trials waited."""
import os

import pytest

UNIT_NICENESS = 10


@pytest.fixture(scope="session", autouse=True)
def _beside_the_integration_tests():
    """Lower this process's CPU priority (and its children's) when it shares the machine with
    the integration tests; keep Ray from starting in it, in any case."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.nice(max(0, UNIT_NICENESS - os.nice(0)))
    from ray._private import auto_init_hook
    auto_init_hook.enable_auto_connect = False  # read at each call, not only at import
    yield
