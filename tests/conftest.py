"""Fixtures every test folder shares."""
import shutil

import pytest


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for one test module's shared fixtures, removed when the module ends, pass or fail.

    pytest keeps only a failed test's own folder (`tmp_path_retention_policy`), but a module
    fixture's folder would stay for the whole session: the suite writes ~22 GB of ResNet-50
    checkpoints in all (~283 MB each with EMA), so each module's goes with the module."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield root
    shutil.rmtree(root, ignore_errors=True)
