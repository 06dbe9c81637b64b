"""Getting a run its nodes, without a cluster: the start rules read autoscaler states built here
(wait for a booting node, fall back on refused spot, give up when nothing comes), the policy's
hooks fed Ray Train's own controller states and exceptions, `classify` of what fit() raises, and
fit_run's loop around a stand-in trainer."""
import os

import pytest
import ray.train
from ray.train.v2._internal.exceptions import (WorkerGroupStartupFailedError,
                                               WorkerGroupStartupTimeoutError)
from ray.train.v2._internal.execution.controller.state import (ReschedulingState,
                                                               RestartingState, RunningState,
                                                               SchedulingState)
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from rn50.config import ConfigError, load_config
from rn50.data.common import DataError
from rn50.distributed import capacity, driver, ray_adapter
from rn50.distributed.cluster_view import Launch, LaunchView, NodeType
from rn50.distributed.contexts import RunContext
from rn50.distributed.start_rules import StartRules, StartState, duration
from rn50.errors import DeviceError, PermanentError

BUNDLE = {"CPU": 1.0, "GPU": 1.0, "accelerator_type:A100": 0.001}
TYPES = {name: NodeType(name, {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                        {"rn50/market": market}, 2)
         for name, market in (("gpu.a100x8.spot", "spot"), ("gpu.a100x8.ondemand", "on-demand"))}
TYPES["cpu.spot"] = NodeType("cpu.spot", {"CPU": 32}, {"rn50/market": "spot"}, 4)


def _rules(*overrides):
    scaling = load_config("demo", ["scaling.spot_wait_s=900", "scaling.start_timeout_s=600",
                                   "scaling.node_start_timeout_s=1200", *overrides]).scaling
    return StartRules(scaling, BUNDLE, TYPES)


def test_a_node_booting_or_installing_is_waited_for_up_to_the_node_start_budget():
    # Red if a cold node were abandoned on a wall clock (spot_wait_s here is far shorter than
    # the boot) or waited for forever.
    rules, state = _rules("scaling.spot_wait_s=60"), StartState("spot", since_s=0.0)
    booting = LaunchView([Launch("gpu.a100x8.spot", "i-0abc", "installing Ray", 10.0)],
                         autoscaler=True)
    verdict = rules.decide(state, booting, now_s=200.0)
    assert verdict.action == "wait", verdict
    assert verdict.message.startswith("node i-0abc (gpu.a100x8.spot) installing Ray, 3m10s")
    assert rules.decide(state, booting, now_s=1200.0).action == "wait"
    late = rules.decide(state, booting, now_s=1300.0)
    assert late.action == "fall_back" and "past scaling.node_start_timeout_s=1200" in late.message
    assert _rules().decide(StartState("on-demand", 0.0), booting, 100.0).action == "wait", \
        "a spot node does not count for an on-demand start"


def test_refused_spot_launches_fall_back_at_once_after_the_configured_count():
    rules, state = _rules("scaling.spot_refusals_to_fall_back=2"), StartState("spot", 100.0)
    one = LaunchView([], [Launch("gpu.a100x8.spot", "", "refused", 101.0)], autoscaler=True)
    assert rules.decide(state, one, 102.0).action == "wait"
    two = LaunchView([], one.refused * 2, autoscaler=True)
    verdict = rules.decide(state, two, 103.0,
                           refusal_reason=lambda node_type: "InsufficientInstanceCapacity")
    assert verdict.action == "fall_back"
    assert verdict.message == ("spot refused by the cloud: 2 launches of gpu.a100x8.spot failed "
                               "(InsufficientInstanceCapacity)")
    old = LaunchView([], [Launch("gpu.a100x8.spot", "", "refused", 10.0)] * 5, autoscaler=True)
    assert rules.decide(state, old, 103.0).action == "wait", "refusals before this start"
    other = LaunchView([], [Launch("cpu.spot", "", "refused", 101.0)] * 5, autoscaler=True)
    assert rules.decide(state, other, 103.0).action == "wait", "a type that cannot hold a worker"


def test_with_nothing_launching_a_start_waits_its_own_limit_then_falls_back_or_gives_up():
    rules = _rules("scaling.spot_wait_s=60", "scaling.start_timeout_s=90")
    quiet = LaunchView(autoscaler=True)
    spot = StartState("spot", since_s=0.0)
    assert rules.decide(spot, quiet, 30.0).message == (
        "waiting for room on spot nodes: no node being launched for them "
        "(30s of scaling.spot_wait_s=60)")
    assert rules.decide(spot, quiet, 61.0).action == "fall_back"
    assert rules.decide(StartState("any", 0.0), quiet, 61.0).action == "wait"
    gone = rules.decide(StartState("any", 0.0), LaunchView(), 91.0)
    assert gone.action == "give_up" and "scaling.start_timeout_s=90" in gone.message
    # The idle clock counts from the last launch seen, not from the start.
    state = StartState("on-demand", 0.0)
    rules.decide(state, LaunchView([Launch("gpu.a100x8.ondemand", "", "requested", 0.0)],
                                   autoscaler=True), 80.0)
    assert rules.decide(state, quiet, 150.0).action == "wait"


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (5, 190, 3725)] == ["5s", "3m10s", "1h02m"]


def _policy(*overrides, market="spot"):
    config = load_config("demo", ["scaling.use_gpu=true", "scaling.accelerator_type=A100",
                                  *overrides])
    scaling = ray.train.ScalingConfig(num_workers=2, use_gpu=True)
    return ray_adapter.RunPolicy(scaling, config.scaling, capacity.worker_bundle(config.scaling),
                                 TYPES, market)


def test_the_policy_falls_back_on_refusals_and_asks_for_spot_again_at_the_next_restart(
        monkeypatch, capsys):
    # Red if the fallback were one-way for the life of the job, or the label selector of the
    # next start did not follow the market.
    policy = _policy("scaling.spot_refusals_to_fall_back=1")
    monkeypatch.setattr(ray_adapter, "_gcs_address", lambda: "unused:1")
    monkeypatch.setattr(policy, "_send_resource_request", lambda: None)
    refused = LaunchView([], [Launch("gpu.a100x8.spot", "", "refused", 2e9)], autoscaler=True)
    monkeypatch.setattr(ray_adapter.cluster_view, "launch_view", lambda address: refused)
    monkeypatch.setattr(ray_adapter.cluster_view, "refusal_reason", lambda node_type: "")
    policy.start.since_s = 2e9 - 1
    assert policy.on_controller_start_worker_group(None, 2) == {"rn50/market": "spot"}
    timeout = ray.train.ControllerError(WorkerGroupStartupTimeoutError(2))
    policy.after_controller_state_update(None, ReschedulingState(timeout))
    assert policy.on_controller_start_worker_group(None, 2) == {"rn50/market": "on-demand"}
    assert "falling back to on-demand nodes" in capsys.readouterr().out
    policy.after_controller_state_update(None, RunningState())
    lost = WorkerGroupError("node died", {0: RuntimeError("node died")})
    policy.after_controller_state_update(None, RestartingState(lost))
    assert policy.on_controller_start_worker_group(None, 2) == {"rn50/market": "spot"}
    assert "asking for spot nodes again" in capsys.readouterr().out


def test_a_permanent_worker_error_ends_the_run_instead_of_a_restart():
    # Red if a wrong data.root or a missing GPU were retried max_failures times (each restart
    # costs minutes on a GPU cluster).
    policy = _policy()
    error = WorkerGroupError("bad root", {0: RuntimeError("collateral"),
                                          1: DataError("no parquet shards for split 'train'")})
    with pytest.raises(ray_adapter.PermanentRunFailure, match="rank 1: no parquet") as raised:
        policy.after_controller_state_update(None, RestartingState(error))
    assert raised.value.exit_code == 2
    failure = ray_adapter.classify(ray.train.ControllerError(raised.value))
    assert (failure.kind, failure.exit_code) == ("permanent", 2)
    gpu = WorkerGroupError("no gpu", {0: DeviceError("torch sees none")})
    assert ray_adapter.classify(gpu) == ray_adapter.Failure("permanent", "rank 0: torch sees none",
                                                            6)


def test_workers_dying_while_starting_are_retried_a_few_times_in_a_row(monkeypatch):
    policy = _policy()
    died = ReschedulingState(ray.train.ControllerError(WorkerGroupStartupFailedError("died")))
    for _ in range(ray_adapter.START_FAILURE_RETRIES):
        policy.after_controller_state_update(None, died)
    policy.after_controller_state_update(None, RunningState())  # the group ran: count again
    for _ in range(ray_adapter.START_FAILURE_RETRIES):
        policy.after_controller_state_update(None, died)
    with pytest.raises(ray_adapter.PermanentRunFailure, match="failed to start 4 times in a row"):
        policy.after_controller_state_update(None, died)


def test_an_elastic_restart_counts_the_failed_groups_own_nodes_and_keeps_its_clock(monkeypatch):
    # A node of a [1, 2] run is lost: Ray keeps the failed group (holding the survivor's CPU)
    # until it starts the next, and calls the state hook every iteration of a waiting start. Red
    # if the survivor's CPU counted as taken (the run waited for a node forever: seen on the
    # rehearsal cluster), or if each no-op iteration restarted the wait's clock ("0s of
    # scaling.start_timeout_s" forever, never giving up).
    config = load_config("demo", ["scaling.num_workers=[1,2]"])
    policy = ray_adapter.ElasticRunPolicy(ray.train.ScalingConfig(num_workers=(1, 2)),
                                          config.scaling, capacity.worker_bundle(config.scaling),
                                          {}, "any")
    monkeypatch.setattr(policy, "_maybe_send_resource_request", lambda: None)
    survivor = ray_adapter.cluster_view.UsableNode("survivor", {}, {"CPU": 0.0}, {"CPU": 1.0})
    monkeypatch.setattr(ray_adapter.cluster_view, "usable_nodes", lambda: [survivor])
    workers = [type("Worker", (), {"metadata": type("Meta", (), {"node_id": node})})()
               for node in ("survivor", "lost")]
    group = type("Group", (), {"workers": workers, "num_workers": 2, "start_time": 0.0})()
    policy.make_decision_for_running_worker_group(group, None)
    lost = RestartingState(WorkerGroupError("node died", {1: RuntimeError("node died")}))
    policy.after_controller_state_update(RunningState(), lost)
    since_s = policy.start.since_s
    policy.after_controller_state_update(lost, lost)  # Ray's no-op iteration
    assert policy.start.since_s == since_s
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 1
    policy.after_controller_state_update(lost, SchedulingState(decision))  # group replaced
    monkeypatch.setattr(ray_adapter, "_gcs_address", lambda: "unused:1")
    monkeypatch.setattr(ray_adapter.cluster_view, "launch_view",
                        lambda address: LaunchView([], autoscaler=False))
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)


class Starts:
    """build_trainer's stand-in: fit() raises each of `errors` in turn, then returns."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), []

    def __call__(self, run, name, storage_uri, callbacks=None, market="any"):
        starts = self

        class Trainer:
            def fit(self):
                starts.calls.append((market, os.environ[capacity.START_TIMEOUT_ENV]))
                if starts.errors:
                    raise starts.errors.pop(0)
                return "result"
        return Trainer()


@pytest.fixture
def quiet_driver(monkeypatch):
    tags = []
    monkeypatch.setattr(driver.tracking.Tracker, "set_tags", lambda tracker, t: tags.append(t))
    monkeypatch.setattr(driver.capacity, "refuse_if_never_fits", lambda scaling: None)
    monkeypatch.setattr(driver.capacity, "initial_market", lambda scaling: "spot")
    monkeypatch.setattr(driver, "_wait_for_storage", lambda uri, timeout_s: None)
    # After a controller's death the driver frees its placement groups: Ray's state API, which
    # would start a local Ray in this process (tests/unit/conftest.py turns that start off).
    monkeypatch.setattr(driver.capacity, "release_orphaned_placement_groups", lambda: [])
    monkeypatch.delenv(capacity.START_TIMEOUT_ENV, raising=False)
    return tags


def _run(*overrides):
    return RunContext(load_config("demo", list(overrides)), "sqlite:///unused.db", "run-id")


def test_fit_run_turns_the_policys_verdicts_into_the_projects_errors(monkeypatch, quiet_driver):
    gave_up = ray.train.ControllerError(ray_adapter.StartGaveUp("nothing came"))
    monkeypatch.setattr(driver, "build_trainer", Starts(gave_up))
    with pytest.raises(capacity.ResourcesUnavailableError, match="nothing came"):
        driver.fit_run(_run("scaling.start_check_s=7"), "r", "/tmp/unused")
    permanent = ray.train.ControllerError(ray_adapter.PermanentRunFailure("no GPU", 6))
    monkeypatch.setattr(driver, "build_trainer", Starts(permanent))
    with pytest.raises(PermanentError, match="no GPU") as raised:
        driver.fit_run(_run(), "r", "/tmp/unused")
    assert raised.value.exit_code == 6
    assert quiet_driver[0] == {"rn50.market": "spot", "rn50.fallback_reason": ""}
    assert capacity.START_TIMEOUT_ENV not in os.environ, "the driver's environment is restored"


def test_a_dead_controller_is_restarted_and_progress_resets_the_count(monkeypatch, quiet_driver):
    # Red if a week-long run were limited to max_failures controller deaths in its life.
    def died():
        return ray.train.ControllerError(RuntimeError("storage unreachable"))
    marks = iter(["c1", "c2", "c3", "c4"])  # newest checkpoint before, then after each death
    monkeypatch.setattr(driver, "_progress", lambda uri, name: next(marks))
    starts = Starts(died(), died(), died())
    monkeypatch.setattr(driver, "build_trainer", starts)
    assert driver.fit_run(_run("checkpoint.max_failures=1"), "r", "/tmp/x") == "result"
    assert [call[1] for call in starts.calls] == ["30.0"] * 4  # scaling.start_check_s
    marks = iter(["c1", "c1", "c1"])
    monkeypatch.setattr(driver, "_progress", lambda uri, name: next(marks))
    monkeypatch.setattr(driver, "build_trainer", Starts(died(), died()))
    with pytest.raises(ray.train.ControllerError, match="storage unreachable"):
        driver.fit_run(_run("checkpoint.max_failures=1"), "r", "/tmp/x")


def test_a_controller_lost_with_its_node_is_restarted_like_a_failed_one(monkeypatch, quiet_driver):
    # Red if the job ended when the node hosting the Train controller actor went away (found by
    # the chaos run: the driver's ray.get of controller.run raised ActorUnavailableError).
    marks = iter(["c1", "c2", "c3"])
    monkeypatch.setattr(driver, "_progress", lambda uri, name: next(marks))
    starts = Starts(ray.exceptions.ActorUnavailableError("node gone", None),
                    ray.exceptions.ActorDiedError())
    monkeypatch.setattr(driver, "build_trainer", starts)
    assert driver.fit_run(_run("checkpoint.max_failures=1"), "r", "/tmp/x") == "result"
    assert len(starts.calls) == 3
    marks = iter(["c1", "c1", "c1"])  # no progress between: max_failures still applies
    monkeypatch.setattr(driver, "_progress", lambda uri, name: next(marks))
    monkeypatch.setattr(driver, "build_trainer", Starts(ray.exceptions.ActorDiedError(),
                                                        ray.exceptions.ActorDiedError()))
    with pytest.raises(ray.exceptions.ActorDiedError):
        driver.fit_run(_run("checkpoint.max_failures=1"), "r", "/tmp/x")


def test_the_trainer_runs_the_start_policy_and_carries_the_preemption_settings(tmp_path):
    run = _run("checkpoint.max_preemption_failures=7", "checkpoint.preemption_grace_s=15",
               "checkpoint.relax_collectives_on_preemption=true")
    trainer = driver.build_trainer(run, "r", str(tmp_path), market="spot")
    failure = trainer.run_config.failure_config
    assert failure.controller_failure_limit == -1, "start timeouts are the policy's to bound"
    assert (failure.max_preemption_failures, failure.preemption_grace_s,
            failure.relax_collectives_on_preemption) == (7, 15.0, True)
    assert failure.max_failures == run.config.checkpoint.max_failures
    assert isinstance(trainer._rn50_policy, ray_adapter.RunPolicy)
    assert trainer._rn50_policy.on_controller_start_worker_group(None, 2) == \
        {"rn50/market": "spot"}
    elastic = driver.build_trainer(_run("scaling.num_workers=[1,2]"), "r", str(tmp_path))
    assert isinstance(elastic._rn50_policy, ray_adapter.ElasticRunPolicy)


@pytest.mark.parametrize("override, key", [
    ("scaling.start_timeout_s=0", "scaling.start_timeout_s"),
    ("scaling.spot_wait_s=-1", "scaling.spot_wait_s"),
    ("scaling.node_start_timeout_s=0", "scaling.node_start_timeout_s"),
    ("scaling.start_check_s=0", "scaling.start_check_s"),
    ("scaling.spot_refusals_to_fall_back=0", "scaling.spot_refusals_to_fall_back"),
    ("checkpoint.preemption_poll_s=0", "checkpoint.preemption_poll_s"),
    ("checkpoint.preemption_grace_s=-5", "checkpoint.preemption_grace_s"),
    ("checkpoint.max_preemption_failures=-2", "checkpoint.max_preemption_failures")])
def test_bad_capacity_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [override])


def test_the_worker_bundle_is_what_ray_train_requests():
    scaling = load_config("imagenet_90ep").scaling
    assert capacity.worker_bundle(scaling) == {"CPU": 11.0, "GPU": 1.0,
                                               "accelerator_type:A100": 0.001}


def test_without_the_state_api_the_holders_are_the_gcss_placement_groups(monkeypatch):
    def no_dashboard(keys):
        raise RuntimeError("Could not read 'dashboard' from GCS")
    monkeypatch.setattr(capacity, "_holders_from_state_api", no_dashboard)
    monkeypatch.setattr(capacity.ray.util, "placement_group_table", lambda: {
        "4b5d0f2a9c1e77": {"state": "CREATED", "name": "", "bundles": {0: {"CPU": 1.0},
                                                                       1: {"CPU": 1.0}}},
        "9e9e9e9e9e9e9e": {"state": "REMOVED", "name": "gone", "bundles": {0: {"CPU": 2.0}}},
        "1f1f1f1f1f1f1f": {"state": "CREATED", "name": "gpu-only", "bundles": {0: {"GPU": 1.0}}}})
    assert capacity._holders({"CPU"}) == ["placement group 4b5d0f2a9c1e {CPU: 2}"]
