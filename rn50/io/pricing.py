"""What a run's nodes cost: a price per node type, each node's uptime within the run, the sum.

Ray-free arithmetic (the distributed layer lists the nodes). A node is priced by its Ray node type
(the `ray.io/node-group` label the autoscaler sets from cluster.yaml's `available_node_types`),
from one price table for every recipe (`cost.price_table`, by default rn50/node_types.yaml:
cluster.yaml's node types with their EC2 instance type, market and on-demand price) with the
recipe's `cost.usd_per_hour` on top; a node without a type (a laptop) at
`cost.local_usd_per_hour`. Spot nodes get the newest price `describe-spot-price-history` gives in
the cluster's region (`spot_region`), when AWS answers; else their on-demand price.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from rn50.config import ConfigError, CostConfig
from rn50.io.imds import Imds, imds_url

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


BUILTIN_TABLE = Path(__file__).resolve().parents[1] / "node_types.yaml"


@dataclass(frozen=True)
class NodeTypePrice:
    """One row of the price table."""
    instance_type: str
    """The EC2 instance type of the node type (`p4d.24xlarge`)."""
    market: str
    """`spot` or `on-demand`: how cluster.yaml launches it."""
    on_demand_usd_per_hour: float
    """AWS's on-demand price; what a spot node costs when no live spot price can be had."""


def read_price_table(cost: CostConfig) -> dict[str, NodeTypePrice]:
    """`cost.price_table` as {node type: row}: `builtin` (rn50/node_types.yaml), a YAML path of
    the same shape, or `none` (only `cost.usd_per_hour`)."""
    if cost.price_table == "none":
        return {}
    path = BUILTIN_TABLE if cost.price_table == "builtin" else Path(cost.price_table).expanduser()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return {name: NodeTypePrice(str(row["instance_type"]), str(row["market"]),
                                    float(row["on_demand_usd_per_hour"]))
                for name, row in (raw.get("node_types") or {}).items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise PricingError(f"cost.price_table={cost.price_table!r} cannot be read as a price "
                           f"table ({type(err).__name__}: {err}); see rn50/node_types.yaml for "
                           "the shape, or set cost.price_table=builtin") from None


@dataclass(frozen=True)
class Prices:
    """US dollars per hour by node type, and for nodes with no type."""
    by_type: dict[str, float] = field(default_factory=dict)
    local: float = 0.0
    live_spot: dict[str, float] = field(default_factory=dict)
    """Live spot prices by node type, used for the nodes labelled spot."""
    instance_types: dict[str, str] = field(default_factory=dict)
    """EC2 instance type by node type (what the live spot price is asked for)."""

    @classmethod
    def from_config(cls, cost: CostConfig) -> "Prices":
        """The price table with the recipe's own prices on top (before any live spot price)."""
        table = read_price_table(cost)
        by_type = {**{name: row.on_demand_usd_per_hour for name, row in table.items()},
                   **cost.usd_per_hour}
        unpriced = sorted(set(cost.ec2_instance_types) - set(by_type))
        if unpriced:
            raise PricingError(f"'cost.ec2_instance_types' names node types without a price "
                               f"{unpriced}: add them to 'cost.usd_per_hour' (the fallback "
                               "price) or to the price table")
        instance_types = {name: row.instance_type for name, row in table.items()}
        return cls(by_type, cost.local_usd_per_hour,
                   instance_types={**instance_types, **cost.ec2_instance_types})

    def unknown_types(self, node_types) -> list[str]:
        """The node types (names; '' = a local node, always priced) the table lacks."""
        return sorted({name for name in node_types if name and name not in self.by_type})

    def require_known(self, node_types) -> None:
        """Raise PricingError naming every node type the table cannot price: a typed node is
        never priced at $0 (only a node without a type, on a local Ray, is)."""
        unknown = self.unknown_types(node_types)
        if unknown:
            example = ", ".join(f"{t}: 1.23" for t in unknown)
            raise PricingError(f"no price for node type(s) {unknown} of this cluster in the price "
                               f"table or 'cost.usd_per_hour' (they price {sorted(self.by_type)});"
                               f" add them to rn50/node_types.yaml (or your cost.price_table), "
                               f"or set cost.usd_per_hour='{{{example}}}' (US$ per hour). "
                               "Nothing was started")

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


def spot_region(cost: CostConfig) -> str:
    """The region to ask for spot prices: `cost.region`, else $AWS_REGION, $AWS_DEFAULT_REGION,
    else this instance's own region from EC2's metadata service ('' when none says)."""
    for value in (cost.region, os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION")):
        if value:
            return value
    return Imds(imds_url(), timeout_s=1.0).text("/latest/meta-data/placement/region", quiet=True)


def spot_prices(cost: CostConfig, prices: Prices | None = None,
                now: datetime | None = None) -> dict[str, float]:
    """{EC2 instance type: newest Linux spot price, the highest over availability zones} for the
    spot node types of the table; {} when AWS cannot be asked (no region, credentials, network)."""
    prices = prices or Prices.from_config(cost)
    instance_types = sorted(set(prices.instance_types.values()))
    if not instance_types:
        return {}
    region = spot_region(cost)
    if not region:
        logger.warning("no live spot prices: no region in cost.region, AWS_REGION, "
                       "AWS_DEFAULT_REGION or the instance metadata; spot nodes are priced at "
                       "their on-demand price (the price table)")
        return {}
    try:
        import boto3
        client = boto3.client("ec2", region_name=region,
                              endpoint_url=cost.ec2_endpoint_url or None)
        start = (now or datetime.now(timezone.utc)) - timedelta(hours=6)
        pages = client.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=instance_types, ProductDescriptions=["Linux/UNIX"], StartTime=start)
        history = [item for page in pages for item in page.get("SpotPriceHistory", [])]
    except Exception as err:  # noqa: BLE001 - any failure means: price spot nodes from the table
        logger.warning("no live spot prices in %s (%s: %s); spot nodes are priced from the price "
                       "table and cost.usd_per_hour", region, type(err).__name__,
                       str(err).splitlines()[0][:200])
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


def with_spot_prices(prices: Prices, live: dict[str, float]) -> Prices:
    """`prices` with the live spot price of each node type whose EC2 instance type has one
    (applied to the nodes labelled spot only: an on-demand node of the type keeps its price)."""
    spot = {node_type: live[instance_type] for node_type, instance_type
            in prices.instance_types.items() if instance_type in live}
    return replace(prices, live_spot=spot)


def instance_type_of(node_type: str, cost: CostConfig) -> str:
    """The EC2 instance type the price table gives `node_type` ('' when it does not know it)."""
    try:
        return Prices.from_config(cost).instance_types.get(node_type, "")
    except PricingError:
        return ""
