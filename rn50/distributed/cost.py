"""A run's cost while it runs: its nodes from Ray's state API, priced by `rn50.io.pricing`.

Which nodes count: every node of the cluster alive at some time during the run (dead ones from
the state API's record too), each for the part of its uptime that overlaps the run; the head
too, since it runs the driver and the Train controller. That is exact for a cluster that runs one
job at a time (what cluster.yaml's autoscaling gives) and over-counts when jobs share the nodes.

The driver prepares the `CostBasis` (the spent budget check, the node-type check, live spot
prices), logs `cost/usd` from a thread (`CostMeter`), and hands the basis to rank 0, which decides
at each epoch end whether the next epoch still fits the budget (`BudgetGuard`).
"""
from __future__ import annotations

import logging
import threading
import time

import ray
import torch.distributed as dist

from rn50.config import Config
from rn50.io import checkpoints as ckpt
from rn50.distributed import cluster_view
from rn50.distributed.cluster_view import MARKET_LABEL
from rn50.io import pricing, tracking
from rn50.io.pricing import CostBasis, NodeSpan, Prices

logger = logging.getLogger(__name__)
NODE_GROUP_LABEL = "ray.io/node-group"  # the autoscaler's node type (RAY_NODE_TYPE_NAME)
MARKET_TYPE_LABEL = "ray.io/market-type"  # Ray's own market label, where a provider sets it
STOPPED_TAG = "rn50.stopped_by"


def node_spans() -> list[NodeSpan]:
    """Every node the cluster knows, with its type, market and uptime (state API, else GCS)."""
    try:
        from ray.util.state import list_nodes
        nodes = list_nodes(ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                           raise_on_missing_output=False)
        return [_span(n.node_id, n.labels, n.start_time_ms, n.end_time_ms if n.state == "DEAD"
                      else None) for n in nodes]
    except Exception as err:  # noqa: BLE001 - no dashboard: the GCS still knows the live nodes
        logger.debug("state API unavailable (%s); pricing the live nodes from the GCS", err)
        return [_span(n["NodeID"], n.get("Labels"), None, None)
                for n in ray.nodes() if n.get("Alive")]


def _span(node_id: str, labels: dict | None, start_ms, end_ms) -> NodeSpan:
    labels = labels or {}
    market = labels.get(MARKET_LABEL) or labels.get(MARKET_TYPE_LABEL, "")
    return NodeSpan(node_id, labels.get(NODE_GROUP_LABEL, ""), market.lower(),
                    start_ms / 1000 if start_ms else None, end_ms / 1000 if end_ms else None)


def spent_before(config: Config, tracking_uri: str, run_key: str, name: str) -> tuple[float, int]:
    """(US$, run seconds) the run being resumed has cost so far: the larger of MLflow's last
    `cost/usd` and the figure in its newest checkpoint (`run_key` is also the run's folder in
    storage), which survives a head that lost MLflow's newest records. Raises BudgetError when
    that is already at the budget. Reads only: nothing is started or changed."""
    tracked = tracking.latest_metric(tracking_uri, config.tracking.experiment, run_key,
                                     "cost/usd") or (0.0, 0)
    saved = ckpt.spent_of_run(run_key) or (0.0, 0)
    spent = (max(tracked[0], saved[0]), max(tracked[1], saved[1]))
    source = "MLflow's cost/usd"
    if saved[0] > tracked[0]:
        source = "recorded in its newest checkpoint"
        print(f"[rn50] run '{name}' had cost ${saved[0]:.2f} by its newest checkpoint, more than "
              f"MLflow's records say (${tracked[0]:.2f}: they end earlier, as after a restore from "
              "an older backup); its cost and budget count on from the checkpoint's", flush=True)
    pricing.check_budget(config.train.budget_usd, spent[0], name, source)
    return spent


def prepare(config: Config, since_s: float, spent: tuple[float, int]) -> CostBasis:
    """The run's cost basis, once Ray is up: every node type of the cluster (its nodes now and
    every type its autoscaler may launch) priced, or PricingError before anything starts; spot
    node types at their live price when EC2 answers."""
    prices = Prices.from_config(config.cost)
    node_types = {span.node_type for span in node_spans()} | set(cluster_view.cluster_node_types())
    prices.require_known(node_types)
    # Only a cluster with typed nodes has spot prices to ask for (a local Ray costs nothing).
    live = pricing.spot_prices(config.cost, prices) if node_types - {""} else {}
    if live:
        logger.info("live spot prices (US$/h): %s", live)
    return CostBasis(pricing.with_spot_prices(prices, live), since_s,
                     spent_before_usd=spent[0], run_s_before=spent[1],
                     budget_usd=config.train.budget_usd)


def spent_now(basis: CostBasis | None) -> dict:
    """What the run has cost so far, as its checkpoints record it (`checkpoint.SPENT_KEYS`);
    {} without a basis (sweep trials) or when Ray cannot list the nodes."""
    if basis is None:
        return {}
    now = time.time()
    try:  # a price table of zeros (a laptop): nothing to ask Ray
        free = not basis.prices.by_type and not basis.prices.local
        usd = basis.spent_before_usd if free else basis.total_usd(node_spans(), now)
    except Exception as err:  # noqa: BLE001 - a missing figure must never fail a checkpoint
        logger.warning("this checkpoint does not record the run's cost: %s", err)
        return {}
    return dict(zip(ckpt.SPENT_KEYS, (usd, basis.run_s(now))))


class CostMeter:
    """A driver thread logging the run's `cost/usd` and `cost/usd_per_hour` to MLflow every
    `cost.log_every_s` (step: the run's seconds over all its starts)."""

    def __init__(self, basis: CostBasis, tracker: tracking.Tracker, every_s: float):
        self.basis, self.tracker = basis, tracker
        self.every_s = every_s
        self.total_usd: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rn50-cost", daemon=True)

    def __enter__(self) -> "CostMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        """Stop the thread and log the final cost (`self.total_usd`), whatever ended the run:
        a resumed run's budget check reads it back."""
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.total_usd = self.log_now()
        except Exception as err:  # noqa: BLE001 - never mask how the run ended
            logger.warning("could not log the run's final cost: %s", err)

    def log_now(self) -> float:
        """Log the cost so far once; return it (US$)."""
        nodes, now = node_spans(), time.time()
        total = self.basis.total_usd(nodes, now)
        rate = pricing.usd_per_hour(nodes, self.basis.prices)
        self.tracker.log_metrics({"cost/usd": total, "cost/usd_per_hour": rate},
                                 step=self.basis.run_s(now))
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.log_now()
            except Exception as err:  # noqa: BLE001 - a metric must never end a training run
                logger.warning("could not log the run's cost: %s", err)


class BudgetGuard:
    """Rank 0's budget check at each epoch end, shared with every rank (a collective)."""

    def __init__(self, basis: CostBasis | None, tracker: tracking.Tracker, rank: int):
        self.basis, self.tracker, self.rank = basis, tracker, rank
        self._epoch_started = time.monotonic()

    def stop_after(self, epoch: int, last: bool) -> bool:
        """Whether the run stops after `epoch`: another epoch as long as this one would take the
        cost past `train.budget_usd`. Every rank must call it (rank 0 decides)."""
        now, epoch_s = time.monotonic(), time.monotonic() - self._epoch_started
        self._epoch_started = now
        if self.basis is None or self.basis.budget_usd <= 0 or last:
            return False
        stop = self._decide(epoch, epoch_s) if self.rank == 0 else False
        if dist.is_initialized():
            shared = [stop]
            dist.broadcast_object_list(shared, src=0)
            stop = shared[0]
        return stop

    def _decide(self, epoch: int, epoch_s: float) -> bool:
        nodes = node_spans()
        spent = self.basis.total_usd(nodes, time.time())
        rate = pricing.usd_per_hour(nodes, self.basis.prices)
        if not self.basis.crosses_budget(spent, rate, epoch_s):
            return False
        budget = self.basis.budget_usd
        logger.warning(
            "[rn50 rank0] budget: $%.2f spent, the next epoch (~%.0f s at $%.2f/h) would pass "
            "train.budget_usd=%g; stopping after epoch %d with a checkpoint. Rerun the same "
            "command with a higher train.budget_usd to continue", spent, epoch_s, rate, budget,
            epoch)
        self.tracker.set_tags({STOPPED_TAG: "budget", "rn50.budget_usd": budget,
                               "rn50.cost_usd": round(spent, 4), "rn50.stopped_after_epoch": epoch})
        return True
