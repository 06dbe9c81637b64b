"""Getting a run's workers their nodes: what each worker asks for, which market it asks for
first, and, when a start gives up, what was missing and who holds it.

With `scaling.prefer_spot` a run asks for nodes labelled `rn50/market=spot` (cluster.yaml labels
its node types with `labels:`; autoscaler v2 launches only a node type whose labels match a
pending request's label selector), and falls back to `rn50/market=on-demand` when the start
policy says spot cannot be had (rn50.distributed.start_rules, run in Ray Train's controller by
rn50.distributed.ray_adapter). Ray Train's worker-group start timeout, which Ray reads from the
driver's environment (`ray_train_env`), is how often a waiting start looks again.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import ray

from rn50.config import ScalingConfig
from rn50.distributed import cluster_view
from rn50.distributed.cluster_view import MARKET_LABEL

logger = logging.getLogger(__name__)
# Ray Train copies these from the driver's environment to its controller when fit() starts it
# (ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"


class ResourcesUnavailableError(RuntimeError):
    """A run's workers could not get their resources within the configured time."""
    exit_code = 4


def initial_market(scaling: ScalingConfig) -> str:
    """The market the first start asks for: `spot` with `scaling.prefer_spot` where nodes carry
    market labels (or the autoscaler's node types do), else `any`, saying once why."""
    if not scaling.prefer_spot:
        return "any"
    labelled = [node for node in ray.nodes() if node.get("Alive")
                and MARKET_LABEL in (node.get("Labels") or {})]
    launchable = [spec for spec in cluster_view.cluster_node_types().values()
                  if MARKET_LABEL in spec.labels]
    if labelled or launchable:
        return "spot"
    print(f"[rn50] scaling.prefer_spot ignored: no node of this cluster carries a "
          f"{MARKET_LABEL} label and no autoscaler can launch one (a workstation's or a "
          "hand-started Ray); the run takes any node that fits", flush=True)
    return "any"


def refuse_if_never_fits(scaling: ScalingConfig) -> None:
    """ResourcesUnavailableError at once when no autoscaler can add nodes and the cluster's
    nodes, all free, could not hold the minimum of workers (a GPU run on a laptop)."""
    if cluster_view.cluster_node_types() or \
            cluster_view.launch_view(ray.get_runtime_context().gcs_address).autoscaler:
        return
    bundle = worker_bundle(scaling)
    room = sum(min(int((node.get("Resources") or {}).get(key, 0.0) // amount)
                   for key, amount in bundle.items())
               for node in ray.nodes() if node.get("Alive"))
    if room < scaling.min_workers:
        total = {key: ray.cluster_resources().get(key, 0.0) for key in bundle}
        gpu_hint = " (scaling.use_gpu=false trains on the CPU)" if scaling.use_gpu else ""
        raise ResourcesUnavailableError(
            f"the worker group could not start: {'at least ' if scaling.elastic else ''}"
            f"{scaling.min_workers} workers x {fmt_resources(bundle)} can never fit here: this "
            f"Ray cluster has {fmt_resources(total)} in all, room for {room}, and no autoscaler "
            f"to add nodes; lower scaling.num_workers / scaling.cpus_per_worker{gpu_hint}, or "
            "run on a cluster that has them")


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


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """One training worker's resource request, as `build_trainer` makes it."""
    bundle = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        bundle["GPU"] = 1.0
    if scaling.accelerator_type:
        bundle[f"accelerator_type:{scaling.accelerator_type}"] = 0.001  # Ray Train's amount
    return bundle


def fmt_resources(resources: dict[str, float]) -> str:
    """`{CPU: 1, GPU: 1}`: resources as messages show them."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def shortfall_message(scaling: ScalingConfig, market: str, why: str) -> str:
    """What the run asked for, what the cluster has and who holds it, for a start that gave up
    (`why`: the start policy's reason)."""
    bundle = worker_bundle(scaling)
    wanted = {k: v * scaling.min_workers for k, v in bundle.items()}  # what a start cannot lack
    total = {k: ray.cluster_resources().get(k, 0.0) for k in bundle}
    free = {k: ray.available_resources().get(k, 0.0) for k in bundle}
    where = "" if market == "any" else \
        f" on nodes labelled {MARKET_LABEL}={market} ({_labelled_nodes(market)} alive now)"
    lines = [f"the worker group could not start: {why}; "
             f"{'at least ' if scaling.elastic else ''}{scaling.min_workers} workers x "
             f"{fmt_resources(bundle)} = {fmt_resources(wanted)} requested{where}; "
             f"the cluster has {fmt_resources(total)}, of which {fmt_resources(free)} free"]
    holders = _holders(set(bundle))
    if holders:
        lines.append("held by: " + "; ".join(holders))
    lines.append("free those resources, add nodes, or lower scaling.num_workers / "
                 "scaling.cpus_per_worker; rerun the same command to resume")
    return "\n  ".join(lines)


def _labelled_nodes(market: str) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive")
               and (node.get("Labels") or {}).get(MARKET_LABEL) == market)


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
            name = group.get("name") or group_id[:12]
            found.append(f"placement group {name} {fmt_resources(held)}")
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
                         f"({', '.join(members) or 'no actors yet'}) {fmt_resources(held)} of "
                         f"{_job(group.creator_job_id, jobs)}")
    for actor in actors:
        held = {k: v for k, v in (actor.required_resources or {}).items() if k in keys and v}
        if held and not actor.placement_group_id:
            found.append(f"actor {actor.class_name} (pid {actor.pid}) {fmt_resources(held)} of "
                         f"{_job(actor.job_id, jobs)}")
    return found


def _job(job_id: str, jobs: dict) -> str:
    entrypoint = str(jobs.get(job_id, "") or "")
    shown = entrypoint if len(entrypoint) <= 80 else entrypoint[:77] + "..."
    return f"job {job_id}" + (f" ({shown})" if shown else "")


def release_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups of this driver's job that hold no live actor; their ids.

    For a run that is its job's only training run, between two `fit()`s after its Train
    controller died: Ray ties the worker group's placement group to the job, not to the
    controller that made it, so a dead controller's group (its workers gone with it) stays
    reserved until the driver exits, and the next start would wait for the job's own CPUs."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors, list_placement_groups
    context = ray.get_runtime_context()
    job, address = context.get_job_id(), context.gcs_address
    groups = list_placement_groups(address, filters=[("creator_job_id", "=", job)], detail=True,
                                   raise_on_missing_output=False)
    in_use = {actor.placement_group_id for actor in list_actors(
        address, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)}
    removed = []
    for group in groups:
        if group.state != "REMOVED" and group.placement_group_id not in in_use:
            remove_placement_group(PlacementGroup(
                ray.PlacementGroupID.from_hex(group.placement_group_id)))
            removed.append(group.placement_group_id)
    return removed
