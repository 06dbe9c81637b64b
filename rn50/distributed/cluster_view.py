"""What the cluster looks like to a run that needs nodes: which nodes can take workers now, and
what the autoscaler is doing about the rest.

Read from the GCS (no `ray.init` needed for the autoscaler's part): the nodes that are alive,
not being drained and whose raylet answers (a node whose raylet was just killed stays "alive" to
the GCS for up to ~30 s), with their free resources and labels; and autoscaler v2's own record of
launches (requested, booting, installing Ray, refused by the cloud). The start policy
(`rn50.distributed.start_policy`) decides from these; nothing here decides anything.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml

logger = logging.getLogger(__name__)
RAYLET_PROBE_TIMEOUT_S = 1.0
MARKET_LABEL = "rn50/market"  # cluster.yaml labels every worker type spot or on-demand
CLUSTER_CONFIG_ENV = "RN50_CLUSTER_CONFIG"
DEFAULT_CLUSTER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class UsableNode:
    """A node that can take a worker now."""
    node_id: str
    labels: dict[str, str]
    free: dict[str, float]
    """Resources not held by anyone (GCS's view, refreshed about every second)."""
    total: dict[str, float]


@dataclass(frozen=True)
class Launch:
    """One node the autoscaler is bringing up, or tried to."""
    node_type: str
    """The Ray node type (cluster.yaml's `available_node_types` name)."""
    instance_id: str
    """The cloud's instance id once it has one (an EC2 `i-...`), else ''."""
    state: str
    """What it is doing: `requested`, `booting`, `installing Ray`, ... or `refused` (failed)."""
    since_s: float
    """When the launch was requested (epoch seconds)."""
    reason: str = ""
    """Why the cloud refused it (refused launches only), as the cloud said it."""


@dataclass(frozen=True)
class LaunchView:
    """The autoscaler's launches at one moment; empty where no autoscaler runs."""
    pending: list[Launch] = field(default_factory=list)
    refused: list[Launch] = field(default_factory=list)
    autoscaler: bool = False
    """Whether an autoscaler (v2) reported its state: only then are nodes ever launched."""


def _raylet_answers(address: str, port: int) -> bool:
    """Whether the node's raylet accepts a TCP connection (a dead one is refused at once on the
    same machine and times out across machines)."""
    try:
        with socket.create_connection((address, port), timeout=RAYLET_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def usable_nodes() -> list[UsableNode]:
    """Alive, not draining, raylet answering: the nodes a worker group can be placed on now."""
    from ray._private.state import available_resources_per_node, state
    draining = set(state.get_draining_nodes())
    free = available_resources_per_node()
    usable = []
    for node in ray.nodes():
        node_id = node["NodeID"]
        if not node.get("Alive") or node_id in draining:
            continue
        if not _raylet_answers(node["NodeManagerAddress"], node["NodeManagerPort"]):
            logger.info("node %s counts as alive but its raylet does not answer: not used",
                        node_id[:12])
            continue
        usable.append(UsableNode(node_id, dict(node.get("Labels") or {}),
                                 dict(free.get(node_id, {})), dict(node.get("Resources") or {})))
    return usable


@dataclass(frozen=True)
class NodeType:
    """One of the cluster config's `available_node_types`."""
    name: str
    resources: dict[str, float]
    labels: dict[str, str]
    max_workers: int


def cluster_config_path() -> Path | None:
    """The autoscaler's config file on this machine: $RN50_CLUSTER_CONFIG, else where `ray up`
    writes it on the head (~/ray_bootstrap_config.yaml); None where there is none (a laptop)."""
    path = Path(os.environ.get(CLUSTER_CONFIG_ENV) or DEFAULT_CLUSTER_CONFIG).expanduser()
    return path if path.is_file() else None


def cluster_node_types() -> dict[str, NodeType]:
    """The node types the autoscaler may launch, from its config file ({} without one)."""
    path = cluster_config_path()
    if path is None:
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    return {name: NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                           {k: str(v) for k, v in (spec.get("labels") or {}).items()},
                           int(spec.get("max_workers", config.get("max_workers", 0)) or 0))
            for name, spec in (config.get("available_node_types") or {}).items()}


def launch_view(gcs_address: str) -> LaunchView:
    """The autoscaler's pending and refused launches, from its last report to the GCS."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
    try:
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(gcs_address).get_cluster_status(timeout_s=10))
    except Exception as err:  # noqa: BLE001 - an unanswered question is "no autoscaler"
        logger.debug("no autoscaler state: %s", err)
        return LaunchView()
    state = reply.autoscaling_state
    if not state.autoscaler_state_version:
        return LaunchView()
    now = time.time()
    pending = [Launch(r.ray_node_type_name, "", "requested", r.request_ts or now)
               for r in state.pending_instance_requests for _ in range(max(1, r.count))]
    pending += [Launch(i.ray_node_type_name, i.instance_id, i.details or "starting", now)
                for i in state.pending_instances]
    refused = [Launch(r.ray_node_type_name, "", "refused", r.start_ts or r.failed_ts,
                      r.reason) for r in state.failed_instance_requests]
    return LaunchView(pending, refused, autoscaler=True)


def refusal_reason(node_type: str, max_bytes: int = 256 * 1024) -> str:
    """The cloud's error for the newest failed launch of `node_type`, from the autoscaler's log on
    this node (the head): autoscaler v2 keeps it only there ('' when it cannot be found)."""
    try:
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except AttributeError:  # not connected to Ray
        return ""
    marker = f"nodes of type {node_type}: "
    for path in sorted(logs.glob("monitor*.log"), reverse=True):
        with open(path, "rb") as log:
            log.seek(max(0, path.stat().st_size - max_bytes))
            lines = log.read().decode(errors="replace").splitlines()
        found = [line.split(marker, 1)[1] for line in lines if "Failed to launch" in line
                 and marker in line]
        if found:
            return found[-1].strip()[:300]
    return ""
