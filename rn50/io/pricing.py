"""What a run's nodes cost: a price per node type, each node's uptime within the run, the sum.

Ray-free arithmetic (the distributed layer lists the nodes). A node is priced by its Ray node type
(the `ray.io/node-group` label the autoscaler sets from cluster.yaml's `available_node_types`);
a node without one (a laptop) at `cost.local_usd_per_hour`. Spot nodes of node types with an EC2
instance type get the newest price `describe-spot-price-history` gives, when AWS answers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from rn50.config import ConfigError, CostConfig

logger = logging.getLogger(__name__)


class PricingError(ConfigError):
    """The price table cannot price the run's nodes (the message says which key to set)."""


class BudgetError(ConfigError):
    """`train.budget_usd` is already spent by the run being resumed."""


@dataclass(frozen=True)
class NodeSpan:
    """One Ray node and when it was up (epoch seconds)."""
    node_id: str
    node_type: str
    """The node's Ray node type; empty for a node started by hand (or locally)."""
    market: str
    """`spot`, `on-demand` or empty when the node does not say."""
    start_s: float | None
    """When the node started; None when Ray does not say (counted from the run's start)."""
    end_s: float | None = None
    """When the node died; None while it is alive."""


@dataclass(frozen=True)
class Prices:
    """US dollars per hour by node type, and for nodes with no type."""
    by_type: dict[str, float] = field(default_factory=dict)
    local: float = 0.0
    live_spot: dict[str, float] = field(default_factory=dict)
    """Live spot prices by node type, used for the nodes labelled spot."""

    @classmethod
    def from_config(cls, cost: CostConfig) -> "Prices":
        """The table as the recipe gives it (before any live spot price)."""
        return cls(dict(cost.usd_per_hour), cost.local_usd_per_hour)

    def unknown_types(self, nodes: list[NodeSpan]) -> list[str]:
        """Node types of `nodes` the table lacks (none while the table is empty)."""
        if not self.by_type:
            return []
        return sorted({n.node_type for n in nodes
                       if n.node_type and n.node_type not in self.by_type})

    def require_known(self, nodes: list[NodeSpan]) -> None:
        """Raise PricingError naming every node type the table cannot price."""
        unknown = self.unknown_types(nodes)
        if unknown:
            example = ", ".join(f"{t}: 1.23" for t in unknown)
            raise PricingError(f"no price for node type(s) {unknown} of this cluster in "
                               f"'cost.usd_per_hour' (it prices {sorted(self.by_type)}); add "
                               f"them, e.g. cost.usd_per_hour='{{{example}}}' (US$ per hour)")

    def price(self, node: NodeSpan) -> float:
        """US$ per hour of `node`. A type the table lacks (a node launched after the preflight)
        gets the table's highest price: a budget must rather stop early than overspend."""
        if not node.node_type or not self.by_type:
            return self.local
        if node.market == "spot" and node.node_type in self.live_spot:
            return self.live_spot[node.node_type]
        if node.node_type in self.by_type:
            return self.by_type[node.node_type]
        return max(self.by_type.values())


def _overlap_s(node: NodeSpan, since_s: float, now_s: float) -> float:
    start = since_s if node.start_s is None else max(node.start_s, since_s)
    end = now_s if node.end_s is None else min(node.end_s, now_s)
    return max(0.0, end - start)


def cost_usd(nodes: list[NodeSpan], prices: Prices, since_s: float, now_s: float) -> float:
    """What `nodes` cost between `since_s` and `now_s`: each node's price times its uptime
    within that window."""
    return sum(prices.price(n) * _overlap_s(n, since_s, now_s) / 3600.0 for n in nodes)


def usd_per_hour(nodes: list[NodeSpan], prices: Prices) -> float:
    """What the nodes alive now cost per hour."""
    return sum(prices.price(n) for n in nodes if n.end_s is None)


@dataclass(frozen=True)
class CostBasis:
    """What a run's cost is computed from, handed by the driver to its rank 0."""
    prices: Prices
    since_s: float
    """When this start of the run began (epoch seconds): its nodes are counted from then."""
    spent_before_usd: float = 0.0
    """What earlier starts of the run cost (`rn50.distributed.cost.spent_before`)."""
    run_s_before: float = 0.0
    """How long earlier starts ran (that value's step), so `cost/usd`'s step keeps growing."""
    budget_usd: float = 0.0

    def total_usd(self, nodes: list[NodeSpan], now_s: float) -> float:
        """The run's cost so far, earlier starts included."""
        return self.spent_before_usd + cost_usd(nodes, self.prices, self.since_s, now_s)

    def run_s(self, now_s: float) -> int:
        """Seconds the run has been running over all its starts (the step of `cost/usd`)."""
        return int(self.run_s_before + max(0.0, now_s - self.since_s))

    def crosses_budget(self, cost_now_usd: float, rate_usd_per_h: float, epoch_s: float) -> bool:
        """Whether another epoch as long as the last would take the run past its budget."""
        if self.budget_usd <= 0:
            return False
        return cost_now_usd + rate_usd_per_h * epoch_s / 3600.0 > self.budget_usd


def check_budget(budget_usd: float, spent_usd: float, name: str,
                 source: str = "MLflow's cost/usd") -> None:
    """Raise BudgetError when a budget is set that the run has already spent (`source`: where
    that figure was read, for the message)."""
    if budget_usd > 0 and spent_usd >= budget_usd:
        raise BudgetError(
            f"train.budget_usd={budget_usd:g} but run '{name}' has already cost "
            f"${spent_usd:.2f} ({source}); set train.budget_usd above {spent_usd:.2f} "
            "to continue it (or 0 for no budget). Nothing was changed.")


def spot_prices(cost: CostConfig, now: datetime | None = None) -> dict[str, float]:
    """{EC2 instance type: newest Linux spot price, the highest over availability zones} for
    `cost.ec2_instance_types`; {} when AWS cannot be asked (no credentials, no network)."""
    instance_types = sorted(set(cost.ec2_instance_types.values()))
    if not instance_types:
        return {}
    try:
        import boto3
        client = boto3.client("ec2", region_name=cost.region or None,
                              endpoint_url=cost.ec2_endpoint_url or None)
        start = (now or datetime.now(timezone.utc)) - timedelta(hours=6)
        pages = client.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=instance_types, ProductDescriptions=["Linux/UNIX"], StartTime=start)
        history = [item for page in pages for item in page.get("SpotPriceHistory", [])]
    except Exception as err:  # noqa: BLE001 - any failure means: price spot nodes from the table
        logger.warning("no live spot prices (%s: %s); spot nodes are priced from "
                       "cost.usd_per_hour", type(err).__name__, str(err).splitlines()[0][:200])
        return {}
    return newest_by_type(history)


def newest_by_type(history: list[dict]) -> dict[str, float]:
    """From `SpotPriceHistory` items: per instance type, the highest of each zone's newest price
    (the zone a node runs in is not known here, so the dearest: a budget must not overspend)."""
    newest: dict[tuple[str, str], dict] = {}
    for item in history:
        key = (item["InstanceType"], item.get("AvailabilityZone", ""))
        if key not in newest or item["Timestamp"] > newest[key]["Timestamp"]:
            newest[key] = item
    prices: dict[str, float] = {}
    for (instance_type, _), item in newest.items():
        prices[instance_type] = max(prices.get(instance_type, 0.0), float(item["SpotPrice"]))
    return prices


def with_spot_prices(prices: Prices, cost: CostConfig, live: dict[str, float]) -> Prices:
    """`prices` with the live spot price of each node type whose EC2 instance type has one
    (applied to the nodes labelled spot only: an on-demand node of the type keeps its price)."""
    spot = {node_type: live[instance_type] for node_type, instance_type
            in cost.ec2_instance_types.items() if instance_type in live}
    return replace(prices, live_spot=spot)
