"""A bare `train_full.py` runs what the Ray head names (RN50_RECIPE, RN50_STORAGE,
MLFLOW_TRACKING_URI), else the local defaults, and its first lines say which and why."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rn50.io import job_defaults

REPO = Path(__file__).resolve().parents[2]
ENVS = (job_defaults.RECIPE_ENV, job_defaults.STORAGE_ENV, job_defaults.TRACKING_ENV)


@pytest.fixture
def bare_env(monkeypatch):
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_flag_beats_the_heads_variable_which_beats_the_local_default(bare_env):
    recipe, storage = job_defaults.recipe(None), job_defaults.storage(None)
    assert (recipe.value, storage.value) == ("demo", "./runs")
    assert "the default" in recipe.reason and "$RN50_RECIPE is not set" in recipe.reason
    bare_env.setenv("RN50_RECIPE", "imagenet_fast_16")
    bare_env.setenv("RN50_STORAGE", "s3://bucket/rn50/runs")
    recipe, storage = job_defaults.recipe(None), job_defaults.storage(None)
    assert (recipe.value, storage.value) == ("imagenet_fast_16", "s3://bucket/rn50/runs")
    assert recipe.line("recipe") == (
        "[rn50] recipe: imagenet_fast_16 (from $RN50_RECIPE in the environment, which "
        "cluster.yaml sets on the head; --recipe overrides it)")
    assert "from $RN50_STORAGE" in storage.reason
    recipe, storage = job_defaults.recipe("imagenette"), job_defaults.storage("/data/runs")
    assert (recipe.value, recipe.reason) == ("imagenette", "from --recipe")
    assert (storage.value, storage.reason) == ("/data/runs", "from --storage")
    bare_env.setenv("RN50_RECIPE", "")  # set but empty: as unset
    assert job_defaults.recipe(None).value == "demo"


def test_the_tracking_store_and_where_it_came_from(bare_env, tmp_path):
    bare_env.chdir(tmp_path)
    default = job_defaults.tracking("", [])
    assert default.value == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "$MLFLOW_TRACKING_URI is not set" in default.reason
    bare_env.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    head = job_defaults.tracking("", [])
    assert head.value == "http://10.0.0.5:5000" and "from $MLFLOW_TRACKING_URI" in head.reason
    recipe = job_defaults.tracking("http://mlflow:5000", ["optim.lr=0.1"])
    assert (recipe.value, recipe.reason) == ("http://mlflow:5000", "from the recipe's tracking.uri")
    given = job_defaults.tracking("http://mlflow:5000", ["tracking.uri=http://mlflow:5000"])
    assert given.reason == "from the override tracking.uri="


def _train_full(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENVS and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "ray_jobs/train_full.py", *args], cwd=REPO,
                          env={**env, **env_extra}, capture_output=True, text=True, timeout=120)


def test_the_entrypoint_says_first_which_recipe_it_runs_and_why(tmp_path):
    # A bad recipe named by the head: the job's first line says where the name came from, and it
    # stops (exit 2) before Ray starts. Red if the entrypoint ignores RN50_RECIPE (it would train
    # the demo) or chooses silently.
    proc = _train_full({"RN50_RECIPE": "no_such_recipe"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (
        "[rn50] recipe: no_such_recipe (from $RN50_RECIPE in the environment, which cluster.yaml "
        "sets on the head; --recipe overrides it)")
    assert "unknown recipe 'no_such_recipe'" in proc.stderr
    # The storage and tracking lines after a valid recipe: tests/integration/test_job_submit.py.
