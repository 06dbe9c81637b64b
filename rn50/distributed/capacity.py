"""Getting a run's workers their nodes, or saying within a bounded time why not.

A start of the worker group asks for `num_workers` bundles at once (a placement group). With
`scaling.prefer_spot` the first start asks for nodes labelled `rn50/market=spot` and, when none
come within `scaling.spot_wait_s`, the next asks for `rn50/market=on-demand` (cluster.yaml labels
its node types with `labels:`; autoscaler v2 launches only a node type whose labels match a
pending request's label selector). Every start waits at most its own time: Ray Train's
worker-group start timeout, which Ray reads from the driver's environment (see `ray_train_env`).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.train.v2._internal.exceptions import (  # what the controller raises; no public alias
    InsufficientClusterResourcesError, WorkerGroupStartupFailedError,
    WorkerGroupStartupTimeoutError)
# Ray Train's controller hooks (no public alias either): RunConfig(callbacks=...) passes a
# ControllerCallback through to the controller as it is.
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (InitializingState,
                                                               ReschedulingState,
                                                               RestartingState, RunningState,
                                                               SchedulingState)

from rn50.config import ScalingConfig

logger = logging.getLogger(__name__)
MARKET_LABEL = "rn50/market"
# Ray Train copies these from the driver's environment to its controller when fit() starts it
# (ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"


class ResourcesUnavailableError(RuntimeError):
    """A run's workers could not get their resources within the configured time."""


@dataclass(frozen=True)
class StartPlan:
    """One way of starting the worker group: which nodes to ask for and how long to wait."""
    market: str
    """`spot`, `on-demand` (the `rn50/market` label the nodes must carry) or `any`."""
    wait_s: float
    """How long this start may wait for its placement group, in seconds."""
    wait_key: str
    """The config key `wait_s` comes from (named in messages)."""

    @property
    def label_selector(self) -> dict[str, str] | None:
        """Ray Train's `ScalingConfig.label_selector` for this start (None: any node)."""
        return None if self.market == "any" else {MARKET_LABEL: self.market}


def start_plans(scaling: ScalingConfig) -> list[StartPlan]:
    """The starts a run tries in order: spot then on-demand, or any node."""
    if scaling.prefer_spot:
        return [StartPlan("spot", scaling.spot_wait_s, "scaling.spot_wait_s"),
                StartPlan("on-demand", scaling.start_timeout_s, "scaling.start_timeout_s")]
    return [StartPlan("any", scaling.start_timeout_s, "scaling.start_timeout_s")]


@contextmanager
def ray_train_env(start_timeout_s: float, preemption_poll_s: float):
    """Set Ray Train's start timeout and drain-poll interval for the fit() inside the block."""
    values = {START_TIMEOUT_ENV: str(start_timeout_s), PREEMPTION_POLL_ENV: str(preemption_poll_s)}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ElasticStartTimeout(RuntimeError):
    """An elastic group found room for fewer than its minimum of workers for too long."""


class ElasticStartDeadline(ControllerCallback):
    """Ends the run when an elastic group has gone `wait_s` without trying to start.

    Ray 2.60's elastic policy starts no group at all while fewer than `min` workers fit, and
    waits for them without a deadline (no placement group, so Ray's start timeout never runs);
    this hook gives that wait the same bound as every other start."""

    def __init__(self, wait_s: float):
        self.wait_s, self._waiting_since = wait_s, None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        """Count the time since the group last ran; past `wait_s`, fail the controller."""
        if not isinstance(current_state, (InitializingState, ReschedulingState,
                                          RestartingState)):
            if isinstance(current_state, (SchedulingState, RunningState)):
                self._waiting_since = None  # a start is tried: Ray's own start timeout bounds it
            return
        now = time.monotonic()
        self._waiting_since = self._waiting_since or now
        if now - self._waiting_since > self.wait_s:
            raise ElasticStartTimeout(f"fewer workers than the elastic minimum fit for "
                                      f"{self.wait_s:.0f} s")


def _causes(error: BaseException | None):
    """`error` and what it wraps (Ray's ControllerError nests the hook's exception)."""
    while error is not None:
        yield error
        error = getattr(error, "controller_failure", None) or error.__cause__


def is_start_timeout(controller_failure: BaseException) -> bool:
    """Whether a controller failure is a worker group that did not get its resources in time."""
    return any(isinstance(error, (WorkerGroupStartupTimeoutError, ElasticStartTimeout))
               for error in _causes(controller_failure))


def is_elastic_shortfall(controller_failure: BaseException) -> bool:
    """Whether an elastic group could not start even at its minimum size in time."""
    return any(isinstance(error, ElasticStartTimeout) for error in _causes(controller_failure))


def is_start_failure(controller_failure: BaseException) -> bool:
    """Whether a worker died while the worker group was starting (e.g. its node went away)."""
    return isinstance(controller_failure, WorkerGroupStartupFailedError)


def is_never_enough(controller_failure: BaseException) -> bool:
    """Whether Ray Train found the cluster too small for the run even at full size."""
    return isinstance(controller_failure, InsufficientClusterResourcesError)


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """One training worker's resource request, as `build_trainer` makes it."""
    bundle = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        bundle["GPU"] = 1.0
    if scaling.accelerator_type:
        bundle[f"accelerator_type:{scaling.accelerator_type}"] = 0.001  # Ray Train's amount
    return bundle


def min_workers_fit_now(scaling: ScalingConfig) -> bool:
    """Whether the cluster's free resources now hold the group's minimum of workers."""
    free = ray.available_resources()
    return all(free.get(key, 0.0) >= amount * scaling.min_workers
               for key, amount in worker_bundle(scaling).items())


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def shortfall_message(scaling: ScalingConfig, plan: StartPlan, waited_s: float) -> str:
    """What the run asked for, what the cluster has and who holds it, for a start that failed."""
    bundle = worker_bundle(scaling)
    wanted = {k: v * scaling.min_workers for k, v in bundle.items()}  # what a start cannot lack
    total = {k: ray.cluster_resources().get(k, 0.0) for k in bundle}
    free = {k: ray.available_resources().get(k, 0.0) for k in bundle}
    where = "" if plan.label_selector is None else \
        f" on nodes labelled {MARKET_LABEL}={plan.market} ({_labelled_nodes(plan)} alive now)"
    lines = [f"the worker group did not start within {waited_s:.0f} s ({plan.wait_key}): "
             f"{'at least ' if scaling.elastic else ''}{scaling.min_workers} workers x "
             f"{_fmt(bundle)} = {_fmt(wanted)} requested{where}; "
             f"the cluster has {_fmt(total)}, of which {_fmt(free)} free"]
    holders = _holders(set(bundle))
    if holders:
        lines.append("held by: " + "; ".join(holders))
    lines.append("free those resources, add nodes, or lower scaling.num_workers / "
                 "scaling.cpus_per_worker; rerun the same command to resume")
    return "\n  ".join(lines)


def _labelled_nodes(plan: StartPlan) -> int:
    selector = plan.label_selector or {}
    return sum(1 for node in ray.nodes() if node.get("Alive") and all(
        (node.get("Labels") or {}).get(k) == v for k, v in selector.items()))


def _holders(keys: set[str], limit: int = 8) -> list[str]:
    """Placement groups and actors holding any of `keys`, with their job's entrypoint."""
    try:
        return _holders_from_state_api(keys)[:limit]
    except Exception as err:  # noqa: BLE001 - a message helper must never mask the real error
        logger.info("could not list who holds the resources: %s", err)
    # No dashboard (the state API's server): the GCS still has the placement groups, though not
    # who made them, nor actors outside them.
    found = []
    for group_id, group in ray.util.placement_group_table().items():
        held = _sum_bundles(group.get("bundles", {}).values(), keys)
        if group.get("state") == "CREATED" and held:
            found.append(f"placement group {group.get('name') or group_id[:12]} {_fmt(held)}")
    return found[:limit]


def _sum_bundles(bundles, keys: set[str]) -> dict[str, float]:
    held: dict[str, float] = {}
    for bundle in bundles:
        for key, value in (bundle or {}).items():
            if key in keys:
                held[key] = held.get(key, 0.0) + value
    return held


def _holders_from_state_api(keys: set[str]) -> list[str]:
    from ray.util.state import list_actors, list_jobs, list_placement_groups
    # This cluster's address: left to "auto", the state API may pick another Ray on the same
    # machine (seen on the shared development machine).
    address = ray.get_runtime_context().gcs_address
    groups = list_placement_groups(address, filters=[("state", "=", "CREATED")], detail=True,
                                   raise_on_missing_output=False)
    actors = list_actors(address, filters=[("state", "=", "ALIVE")], detail=True,
                         raise_on_missing_output=False)
    jobs = {job.job_id: job.entrypoint or (job.driver_info.pid if job.driver_info else "")
            for job in list_jobs(address, raise_on_missing_output=False) if job.job_id}
    found = []
    for group in groups:
        held = _sum_bundles((b.get("unit_resources") for b in group.bundles), keys)
        members = sorted({a.class_name for a in actors
                          if a.placement_group_id == group.placement_group_id})
        if held:
            found.append(f"placement group {group.name or group.placement_group_id[:12]} "
                         f"({', '.join(members) or 'no actors yet'}) {_fmt(held)} of "
                         f"{_job(group.creator_job_id, jobs)}")
    for actor in actors:
        held = {k: v for k, v in (actor.required_resources or {}).items() if k in keys and v}
        if held and not actor.placement_group_id:
            found.append(f"actor {actor.class_name} (pid {actor.pid}) {_fmt(held)} of "
                         f"{_job(actor.job_id, jobs)}")
    return found


def _job(job_id: str, jobs: dict) -> str:
    entrypoint = str(jobs.get(job_id, "") or "")
    shown = entrypoint if len(entrypoint) <= 80 else entrypoint[:77] + "..."
    return f"job {job_id}" + (f" ({shown})" if shown else "")
