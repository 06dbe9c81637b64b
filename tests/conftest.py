"""Fixtures every test folder shares; how the suite's two halves run side by side; the Ray
polling intervals and worker priority of the suite's clusters."""
import os
import shutil
from pathlib import Path

import pytest

# The integration modules that hold no wall-clock bound (a start within a minute, a fallback
# within seconds, a budget reckoned from epoch times): they run first, while the unit tests run
# beside them; the rest follow in name order.
UNHURRIED_FIRST = ("test_train_job", "test_faults", "test_tune_sweep", "test_prepare_imagenet",
                   "test_evaluate_job")


def _folder(nodeid: str) -> str:
    """`unit` or `integration`: the folder of a test's node id (tests/<folder>/test_x.py::...)."""
    return nodeid.split("::", 1)[0].split("/")[1]


def pytest_xdist_make_scheduler(config, log):
    """Two xdist groups (pyproject.toml runs `-n 2`): the integration tests in one process, in
    order, sharing their servers and clusters; the unit tests in the other, at a lower CPU
    priority (tests/unit/conftest.py). The unit tests then take the CPU the integration tests
    leave idle while Ray starts processes and jobs wait (27% of two cores on a small training
    job) instead of adding their ~4 minutes to the suite's end. Grouped here, by folder, rather
    than by `xdist_group` marks: under pytest 9.2 xdist's workers lost `--dist loadgroup` from
    the ini's addopts and ran the integration tests on both workers at once."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFolder(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _folder(nodeid)

    return ByFolder(config, log)


def pytest_collection_modifyitems(config, items):
    """The integration modules without a wall-clock bound first (UNHURRIED_FIRST)."""
    def rank(item) -> int:
        module = Path(str(item.fspath)).stem
        if _folder(item.nodeid) == "integration" and module in UNHURRIED_FIRST:
            return UNHURRIED_FIRST.index(module)
        return len(UNHURRIED_FIRST)
    items.sort(key=rank)  # stable: the rest keep their order, each module's tests theirs


# Ray's own pollers, shortened for the suite's ~60 jobs (every test's subprocess, `ray start` and
# job inherits them; a user's cluster keeps Ray's defaults). Ray Train's controller looks at its
# workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a group that finished or failed is seen
# up to 2 s late, at every job's end and every restart (measured on a 2-epoch demo job: 2.5 s
# from the last report to the group's shutdown, 0.6 s at 0.5). The autoscaler's loop
# (AUTOSCALER_UPDATE_INTERVAL_S, 5 s) launches, and retries refused launches, on the rehearsal
# clusters. Neither changes what the product does, only how soon Ray notices.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "1")
# Ray runs its workers, the training processes among them, at nice 15 (RAY_worker_niceness) so
# that its own daemons stay responsive on a busy node. On 2 cores that put every training run below
# everything else the suite runs: the unit tests' nice-10 process (tests/unit/conftest.py), job
# drivers, the S3 and MLflow servers, pytest. At nice 0 the suite's training runs share the CPU
# with those and out-rank the unit tests (the demo job beside the unit tests: 324 s at nice 15,
# 126 s at nice 0; the whole suite 38.4 min and 24.1 min). What a run computes is the same.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for one test module's shared fixtures, removed when the module ends, pass or fail.

    pytest keeps only a failed test's own folder (`tmp_path_retention_policy`), but a module
    fixture's folder would stay for the whole session: the suite writes ~22 GB of ResNet-50
    checkpoints in all (~283 MB each with EMA), so each module's goes with the module."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield root
    shutil.rmtree(root, ignore_errors=True)
