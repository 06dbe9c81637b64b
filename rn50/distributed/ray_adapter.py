"""Everything rn50 takes from Ray Train's internals, in one place, and what it does with it.

Ray Train 2.60 lets a controller's scaling policy choose each worker group's size and label
selector and watch every state change, but has no public way to hand it one: `Trainer` passes
rn50's own (`RunPolicy` / `ElasticRunPolicy`) where `fit()` would build Ray's default. The policy
runs in the controller and
- chooses the market (`rn50/market` label) of each start: spot first with `scaling.prefer_spot`,
  on-demand after `StartRules` says spot cannot be had, spot again at the next restart;
- at every `scaling.start_check_s` a start is still waiting (Ray's start timeout), says what it
  waits for and decides from the autoscaler's state (rn50.distributed.start_rules);
- ends the run at once on an error no restart can fix (`rn50.errors.PermanentError` in a
  worker), and after `START_FAILURE_RETRIES` starts in a row whose workers died while starting;
- for elastic runs, sizes the group from the free resources of usable nodes (alive, not
  draining, raylet answering), not from the cluster's totals as Ray's elastic policy does.

Ray's exception classes and `classify` (what `fit()` raised, as the project's own outcome) are
in rn50.distributed.ray_errors. Ray's internal names used here are checked by
tests/unit/test_ray_adapter.py, which fails if a Ray upgrade renames them.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.controller.state import (ReschedulingState,
                                                               RestartingState, RunningState,
                                                               SchedulingState)
from ray.train.v2._internal.execution.scaling_policy import (ElasticScalingPolicy,
                                                             FixedScalingPolicy, NoopDecision,
                                                             ResizeDecision)

from rn50.config import ScalingConfig
from rn50.io.tracking import Tracker
from rn50.distributed import cluster_view
from rn50.distributed.capacity import ResourcesUnavailableError
from rn50.distributed.ray_errors import (Failure, PermanentRunFailure, StartGaveUp,
                                         WorkerGroupStartupFailedError,
                                         WorkerGroupStartupTimeoutError, classify, permanent_in)
from rn50.distributed.start_rules import MARKET_LABEL, StartRules, StartState

logger = logging.getLogger(__name__)
# A worker group whose workers die while starting is started again; a broken image fails the same
# way every time and must end the run. Counted in a row: a group that ran resets it.
START_FAILURE_RETRIES = 3
__all__ = ["ElasticRunPolicy", "Failure", "PermanentRunFailure", "RunPolicy", "StartGaveUp",
           "Trainer", "classify", "quiet_expected_ends"]
# Failure, PermanentRunFailure, StartGaveUp and classify are ray_errors', named here too: the
# policy raises the middle two, and its tests read all four from the adapter.


class Trainer(TorchTrainer):
    """A TorchTrainer whose controller runs `policy` instead of Ray's default scaling policy."""

    def __init__(self, *args, policy: "RunPolicy | ElasticRunPolicy", **kwargs):
        super().__init__(*args, **kwargs)
        self._rn50_policy = policy

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = self._rn50_policy
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class _StartControl:
    """The policy's rn50 half: markets, waits, permanent errors (see the module docstring)."""

    def _start_control(self, scaling: ScalingConfig, bundle: dict[str, float],
                       node_types: dict, market: str, tracking: Tracker | None):
        self.rules = StartRules(scaling, bundle, node_types)
        self.rn50_scaling, self.bundle, self.tracking = scaling, bundle, tracking
        self.preferred_market = market
        self.start = StartState(market, time.time())
        self.start_failures, self._said_s = 0, 0.0

    def after_controller_start(self, train_run_context):
        """The first start's wait begins now, in the controller (not when the driver built us)."""
        super().after_controller_start(train_run_context)
        self.start = StartState(self.start.market, time.time())
        quiet_expected_ends()

    def on_controller_start_worker_group(self, scaling_config, num_workers):
        """The label selector of this start: the market's (None: any node)."""
        return None if self.start.market == "any" else {MARKET_LABEL: self.start.market}

    def _labelled(self):
        """Ray's scaling config with this start's market as its label selector: what the
        autoscaling requests Ray's policies send must ask for (not any node that fits)."""
        selector = self.on_controller_start_worker_group(None, 0)
        return dataclasses.replace(self.scaling_config, label_selector=selector)

    def _send_resource_request(self):
        self._coordinator_client.send_resource_request(
            self._labelled(), self._get_num_workers_for_resource_request())

    def _maybe_send_resource_request(self):
        self._coordinator_client.maybe_send_resource_request(
            self._labelled(), self._get_num_workers_for_resource_request())

    def after_controller_state_update(self, previous_state, current_state):
        """Look at each start that failed and at each restart; decide what happens next."""
        if current_state is previous_state:
            return  # a waiting start's no-op loop (Ray calls this every iteration): not news
        if isinstance(current_state, RunningState):
            self.start_failures = 0  # the group ran: only failures in a row count
        elif isinstance(current_state, RestartingState):
            permanent = permanent_in(current_state.training_failed_error)
            if permanent is not None:
                raise permanent
            self._new_start(self.preferred_market)  # a run that fell back asks for spot again
        elif isinstance(current_state, ReschedulingState):
            self._after_failed_start(current_state.training_failed_error)

    def _after_failed_start(self, error) -> None:
        cause = getattr(error, "controller_failure", error)
        if isinstance(cause, WorkerGroupStartupTimeoutError):
            self._look()
        elif isinstance(cause, WorkerGroupStartupFailedError):
            self.start_failures += 1
            if self.start_failures > START_FAILURE_RETRIES:
                raise PermanentRunFailure(
                    f"the worker group failed to start {self.start_failures} times in a row "
                    f"({str(cause).splitlines()[0]}): check the nodes' setup (image, installed "
                    "packages) in the workers' logs", 1)
            _say(f"the worker group failed to start ({str(cause).splitlines()[0]}); "
                 "starting it again")

    def _new_start(self, market: str) -> None:
        changed = market != self.start.market
        self.start = StartState(market, time.time())
        if changed:
            _say(f"asking for {market} nodes again ({MARKET_LABEL}={market})")
            self._tag_market(market, "")
            self._send_resource_request()

    def _look(self) -> None:
        """Decide from the autoscaler's state: wait (saying why), fall back, or give up."""
        verdict = self.rules.decide(self.start, cluster_view.launch_view(_gcs_address()),
                                    time.time(), cluster_view.refusal_reason)
        if verdict.action == "fall_back" and self.start.market == "spot":
            _say(f"{verdict.message}\n[rn50] falling back to on-demand nodes "
                 f"({MARKET_LABEL}=on-demand); the run asks for spot again at its next restart")
            self._tag_market("on-demand", verdict.message)
            self.start = StartState("on-demand", time.time())
            self._send_resource_request()  # the autoscaler stops asking for spot now
        elif verdict.action in ("fall_back", "give_up"):
            from rn50.distributed.capacity import shortfall_message
            raise StartGaveUp(shortfall_message(self.rn50_scaling, self.start.market,
                                                verdict.message))
        else:
            _say(f"waiting for {self._wanted()}: {verdict.message}")

    def _wanted(self) -> str:
        from rn50.distributed.capacity import fmt_resources
        count = self.rn50_scaling.num_workers
        count = f"{count[0]}-{count[1]}" if isinstance(count, list) else count
        return f"{count} workers x {fmt_resources(self.bundle)}"

    def _tag_market(self, market: str, reason: str) -> None:
        if self.tracking is None:
            return
        try:
            # MLflow is imported only now, when the market changes: rare
            self.tracking.set_tags({"rn50.market": market, "rn50.fallback_reason": reason[:500]})
        except Exception as err:  # noqa: BLE001 - a tag must never end the run
            logger.warning("could not tag the run's market: %s", err)


def _expected_end(record: logging.LogRecord) -> bool:
    """Whether a log record is Ray's traceback of something the policy decided or handles (not
    a crash): an end it chose, a waiting start's timeout (every `scaling.start_check_s` by
    design, reported in the policy's own "waiting for" line), or a sweep trial that found no
    room (the sweep ends with one message naming what it asked for and who holds it)."""
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        if isinstance(error, (StartGaveUp, PermanentRunFailure, WorkerGroupStartupTimeoutError,
                              ResourcesUnavailableError)):
            return True
        error = getattr(error, "controller_failure", None) or error.__cause__
    return False


TRAIN_LOGGERS = ("ray.train.v2._internal.execution.callback_manager",
                 "ray.train.v2._internal.execution.controller.controller",
                 "ray.train.v2._internal.execution.failure_handling.default")
"""Where Ray Train logs the tracebacks `_expected_end` recognises."""
TUNE_LOGGERS = ("ray.tune.execution.tune_controller",)
"""Where Ray Tune logs each failed trial's traceback."""


def quiet_expected_ends(loggers: tuple[str, ...] = TRAIN_LOGGERS) -> None:
    """Drop Ray's tracebacks of the policy's own decisions (a start that gave up, a permanent
    error, a trial without room) and of the start timeouts it waits with from `loggers`: they
    are not crashes; the policy says what it waits for, and the driver prints an end's message
    once, with what to do. Every other traceback still shows."""
    for name in loggers:
        target = logging.getLogger(name)
        if _keep_unexpected not in target.filters:
            target.addFilter(_keep_unexpected)


def _keep_unexpected(record: logging.LogRecord) -> bool:
    return not _expected_end(record)


def _say(message: str) -> None:
    # print, not logging: Ray forwards the controller's stdout to the job's console.
    print(f"[rn50] {message}", flush=True)


def _gcs_address() -> str:
    return ray.get_runtime_context().gcs_address


class RunPolicy(_StartControl, FixedScalingPolicy):
    """Ray's fixed-size policy plus rn50's start control."""

    def __init__(self, ray_scaling, scaling: ScalingConfig, bundle: dict[str, float],
                 node_types: dict, market: str, tracking: Tracker | None = None):
        super().__init__(ray_scaling)
        self._start_control(scaling, bundle, node_types, market, tracking)


class ElasticRunPolicy(_StartControl, ElasticScalingPolicy):
    """Ray's elastic policy, sized from what is free on usable nodes now, plus start control."""

    def __init__(self, ray_scaling, scaling: ScalingConfig, bundle: dict[str, float],
                 node_types: dict, market: str, tracking: Tracker | None = None):
        super().__init__(ray_scaling)
        self._start_control(scaling, bundle, node_types, market, tracking)
        self._group_nodes: list[str] = []
        """The nodes of the last running group's workers: after a failure that group still
        holds them (Ray shuts it down only when it starts the next), so they count as free."""

    def after_controller_state_update(self, previous_state, current_state):
        """Forget the last group's nodes once a start replaces it (Ray has shut it down)."""
        super().after_controller_state_update(previous_state, current_state)
        if isinstance(current_state, SchedulingState):
            self._group_nodes = []

    def _fitting(self, group_nodes=()) -> int:
        """Workers that fit on usable nodes of the run's market: their free resources plus what
        the workers of this run's group on `group_nodes` (one entry per worker) hold, capped at
        the maximum."""
        held: dict[str, int] = {}
        for node_id in group_nodes:
            held[node_id] = held.get(node_id, 0) + 1
        count = 0
        for node in cluster_view.usable_nodes():
            if self.start.market != "any" and node.labels.get(MARKET_LABEL) != self.start.market:
                continue
            mine = held.get(node.node_id, 0)
            count += min(int((node.free.get(key, 0.0) + mine * amount + 1e-9) // amount)
                         for key, amount in self.bundle.items() if amount > 0)
        return min(count, self.rn50_scaling.max_workers)

    def make_decision_for_non_running_worker_group(self):
        """Start with the workers that fit now (at least the minimum), else wait and look."""
        self._maybe_send_resource_request()  # asks the autoscaler for the maximum
        fitting = self._fitting(self._group_nodes)
        if fitting >= self.rn50_scaling.min_workers:
            _say(f"starting the worker group with {fitting} workers (room for {fitting} now)")
            return self._resize(fitting)
        if time.monotonic() - self._said_s >= self.rn50_scaling.start_check_s:
            self._said_s = time.monotonic()
            self._look()
        time.sleep(1.0)  # the controller asks again at once after a no-op decision
        return NoopDecision()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        """Grow when more workers fit, every `scaling.resize_check_s`."""
        self._maybe_send_resource_request()
        self._group_nodes = [worker.metadata.node_id for worker in worker_group_state.workers]
        now = time.monotonic()
        if now - max(worker_group_state.start_time, self._latest_monitor_time) < \
                self.rn50_scaling.resize_check_s:
            return NoopDecision()
        self._latest_monitor_time = now
        fitting = self._fitting(self._group_nodes)
        if fitting <= worker_group_state.num_workers:
            return NoopDecision()
        _say(f"room for {fitting} workers now: growing the group from "
             f"{worker_group_state.num_workers} (it restarts from the latest checkpoint)")
        return self._resize(fitting)

    def _resize(self, workers: int) -> ResizeDecision:
        return ResizeDecision(num_workers=workers,
                              resources_per_worker=self.scaling_config._resources_per_worker_not_none)
