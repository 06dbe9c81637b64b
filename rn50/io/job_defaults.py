"""What a job runs with when its command line does not say, and the log lines saying why.

The recipe, the storage and the MLflow tracking store each come from the command line, else from
the environment the Ray head was started with (cluster.yaml sets RN50_RECIPE, RN50_STORAGE and
MLFLOW_TRACKING_URI on `ray start`, and every job driver on the head inherits them), else from
the local default: so `ray job submit -- python ray_jobs/train_full.py` typed bare trains what the
cluster is for, and the same command on a laptop trains the digits demo. The first lines of the
job's log name each choice and its source: a surprising run is explained before it costs anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from rn50.io.storage import LOCAL_STORAGE, STORAGE_ENV

RECIPE_ENV = "RN50_RECIPE"
LOCAL_RECIPE = "demo"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
CLUSTER_SETS = "which cluster.yaml sets on the head"


@dataclass(frozen=True)
class Chosen:
    """One setting a job runs with, and why."""
    value: str
    reason: str
    """Where the value came from, as the log says it: the flag, the variable or the default."""

    def line(self, what: str) -> str:
        """`[rn50] <what>: <value> (<reason>)`, one of the first lines of a job's log."""
        return f"[rn50] {what}: {self.value} ({self.reason})"


def _choose(given: str | None, flag: str, env: str, default: str) -> Chosen:
    if given:
        return Chosen(given, f"from {flag}")
    if os.environ.get(env):
        return Chosen(os.environ[env], f"from ${env} in the environment, {CLUSTER_SETS}; {flag} "
                      "overrides it")
    return Chosen(default, f"the default: no {flag}, and ${env} is not set")


def recipe(given: str | None) -> Chosen:
    """The recipe: --recipe, else $RN50_RECIPE (the cluster's), else `demo`."""
    return _choose(given, "--recipe", RECIPE_ENV, LOCAL_RECIPE)


def storage(given: str | None) -> Chosen:
    """Where runs go: --storage, else $RN50_STORAGE (the cluster's), else ./runs."""
    return _choose(given, "--storage", STORAGE_ENV, LOCAL_STORAGE)


def tracking(configured: str, overrides: list[str]) -> Chosen:
    """The MLflow tracking URI the driver will use (`tracking.resolve_tracking_uri`), and why."""
    from rn50.io.tracking import resolve_tracking_uri  # imports MLflow: only once a job runs
    uri = resolve_tracking_uri(configured)
    if configured:
        given = any(o.split("=", 1)[0].strip() == "tracking.uri" for o in overrides)
        return Chosen(uri, "from the override tracking.uri=" if given else "from the recipe's "
                      "tracking.uri")
    if os.environ.get(TRACKING_ENV):
        return Chosen(uri, f"from ${TRACKING_ENV} in the environment, {CLUSTER_SETS}")
    return Chosen(uri, f"the default: no tracking.uri, and ${TRACKING_ENV} is not set")
