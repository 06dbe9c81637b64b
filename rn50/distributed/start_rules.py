"""When a worker group is waiting for nodes: wait on, fall back from spot to on-demand, or give
up, decided from what the autoscaler is doing for it, not from a clock alone.

Plain Python, no Ray: `StartRules.decide` reads a `LaunchView` (rn50.distributed.cluster_view)
and the run's `scaling` settings. A node of the run's kind that is being launched, booting or
installing Ray is waited for up to `scaling.node_start_timeout_s` from when the wait first saw it;
a spot launch the cloud refused `scaling.spot_refusals_to_fall_back` times moves the run to
on-demand nodes at once; with nothing launching for it, a start waits `scaling.spot_wait_s` (spot)
or `scaling.start_timeout_s` before falling back or giving up. The controller asks at every
`scaling.start_check_s` (rn50.distributed.ray_adapter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rn50.config import ScalingConfig
from rn50.distributed.cluster_view import MARKET_LABEL, Launch, LaunchView, NodeType


def duration(seconds: float) -> str:
    """`3m10s`, `1h02m`, `45s`: how long something has been waiting."""
    minutes, secs = divmod(int(round(max(0.0, seconds))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else \
        f"{secs}s"


@dataclass(frozen=True)
class Verdict:
    """What a waiting start does next, and the line that says why."""
    action: str
    """`wait`, `fall_back` (ask for on-demand nodes from now on) or `give_up` (end the run)."""
    message: str


@dataclass
class StartState:
    """What the wait remembers between two looks (one per Train controller)."""
    market: str
    """The nodes asked for now: `spot`, `on-demand` or `any` (unlabelled, any node)."""
    since_s: float
    """When this start began (or its market changed), epoch seconds."""
    last_launch_s: float = 0.0
    """The last time a node was being launched for it."""
    first_seen_s: dict[str, float] = field(default_factory=dict)
    """When the wait first saw each pending launch (keyed by instance id, else node type)."""


class StartRules:
    """The decisions of one run's starts, for its worker bundle and the cluster's node types."""

    def __init__(self, scaling: ScalingConfig, bundle: dict[str, float],
                 node_types: dict[str, NodeType]):
        self.scaling, self.bundle, self.node_types = scaling, bundle, node_types

    def serves(self, node_type: str, market: str) -> bool:
        """Whether a node of `node_type` could take one of this run's workers in `market`
        (types the cluster config does not describe count: better wait than give up early)."""
        spec = self.node_types.get(node_type)
        if spec is None:
            return True
        if market != "any" and spec.labels.get(MARKET_LABEL) != market:
            return False
        return all(spec.resources.get(key, 0.0) >= amount for key, amount in self.bundle.items())

    def decide(self, state: StartState, view: LaunchView, now_s: float,
               refusal_reason=lambda node_type: "") -> Verdict:
        """Wait, fall back or give up, for a start that does not have its nodes yet."""
        scaling, spot = self.scaling, state.market == "spot"
        refused = [launch for launch in view.refused if launch.since_s >= state.since_s - 1
                   and self.serves(launch.node_type, state.market)]
        if spot and len(refused) >= scaling.spot_refusals_to_fall_back:
            kinds = sorted({launch.node_type for launch in refused})
            reason = refusal_reason(kinds[0]) or "the cloud gave no reason to Ray"
            return Verdict("fall_back", f"spot refused by the cloud: {len(refused)} launches of "
                                        f"{', '.join(kinds)} failed ({reason})")
        pending = [launch for launch in view.pending
                   if self.serves(launch.node_type, state.market)]
        if pending:
            return self._while_launching(state, pending, now_s)
        idle_s = now_s - max(state.since_s, state.last_launch_s)
        limit_s, key = (scaling.spot_wait_s, "scaling.spot_wait_s") if spot else \
            (scaling.start_timeout_s, "scaling.start_timeout_s")
        where = f"{state.market} nodes" if state.market != "any" else "nodes"
        if idle_s > limit_s:
            message = (f"no room for the workers on {where} and no node launched for them "
                       f"within {key}={limit_s:g}")
            return Verdict("fall_back" if spot else "give_up", message)
        launching = "no autoscaler to launch nodes" if not view.autoscaler else \
            "no node being launched for them"
        return Verdict("wait", f"waiting for room on {where}: {launching} "
                               f"({duration(idle_s)} of {key}={limit_s:g})")

    def _while_launching(self, state: StartState, pending: list[Launch], now_s: float) -> Verdict:
        """A node is on its way: wait for it, up to `scaling.node_start_timeout_s`."""
        state.last_launch_s = now_s
        keys = {launch.instance_id or f"{launch.node_type}#{i}": launch
                for i, launch in enumerate(pending)}
        for key, launch in keys.items():
            state.first_seen_s.setdefault(key, min(now_s, launch.since_s or now_s))
        key, launch = min(keys.items(), key=lambda item: state.first_seen_s[item[0]])
        age_s = now_s - state.first_seen_s[key]
        name = f"node {launch.instance_id} ({launch.node_type})" if launch.instance_id else \
            f"a {launch.node_type} node"
        limit_s = self.scaling.node_start_timeout_s
        if age_s <= limit_s:
            more = f" (+{len(pending) - 1} more)" if len(pending) > 1 else ""
            return Verdict("wait", f"{name} {launch.state}, {duration(age_s)}{more} "
                                   f"(scaling.node_start_timeout_s={limit_s:g})")
        message = (f"{name} has been {launch.state} for {duration(age_s)}, past "
                   f"scaling.node_start_timeout_s={limit_s:g}")
        return Verdict("fall_back" if state.market == "spot" else "give_up", message)
