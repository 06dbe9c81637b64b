"""fit_run's start plans without a cluster: spot first then on-demand, each start bounded by its
own time, the timeout handed to Ray Train through the driver's environment, and a run whose last
start times out ending with ResourcesUnavailableError. The trainer is a stand-in whose fit()
raises what Ray Train's controller raises (ControllerError around
WorkerGroupStartupTimeoutError)."""
import os

import pytest
import ray.train
from ray.train.v2._internal.exceptions import (WorkerGroupStartupFailedError,
                                               WorkerGroupStartupTimeoutError)

from rn50.config import ConfigError, load_config
from rn50.distributed import capacity, driver
from rn50.distributed.contexts import RunContext


class Starts:
    """build_trainer's stand-in: records each start; fit() raises `error` `timeouts` times."""

    def __init__(self, timeouts: int, error=lambda: WorkerGroupStartupTimeoutError(2)):
        self.timeouts, self.calls, self.error = timeouts, [], error

    def __call__(self, run, name, storage_uri, callbacks=None, label_selector=None):
        starts = self

        class Trainer:
            def fit(self):
                starts.calls.append((label_selector, os.environ[capacity.START_TIMEOUT_ENV],
                                     os.environ[capacity.PREEMPTION_POLL_ENV]))
                if len(starts.calls) <= starts.timeouts:
                    raise ray.train.ControllerError(starts.error())
                return "result"
        return Trainer()


@pytest.fixture
def tags(monkeypatch):
    recorded = []
    monkeypatch.setattr(driver.tracking, "set_tags", lambda uri, run_id, t: recorded.append(t))
    monkeypatch.setattr(capacity, "shortfall_message", lambda scaling, plan, waited_s:
                        f"nothing for {plan.market} in {waited_s:.0f} s")
    monkeypatch.delenv(capacity.START_TIMEOUT_ENV, raising=False)
    return recorded


def _run(*overrides):
    return RunContext(load_config("demo", list(overrides)), "sqlite:///unused.db", "run-id")


def test_spot_first_then_on_demand_each_with_its_own_wait(monkeypatch, tags, capsys):
    starts = Starts(timeouts=1)
    monkeypatch.setattr(driver, "build_trainer", starts)
    run = _run("scaling.prefer_spot=true", "scaling.spot_wait_s=30", "scaling.start_timeout_s=90",
               "checkpoint.preemption_poll_s=2")
    assert driver.fit_run(run, "r", "/tmp/unused") == "result"
    assert starts.calls == [({"rn50/market": "spot"}, "30.0", "2.0"),
                            ({"rn50/market": "on-demand"}, "90.0", "2.0")]
    assert [t["rn50.market"] for t in tags] == ["spot", "on-demand"]
    assert tags[-1]["rn50.fallback_reason"].startswith("no spot capacity: nothing for spot")
    assert "falling back to on-demand nodes" in capsys.readouterr().out
    assert capacity.START_TIMEOUT_ENV not in os.environ, "the driver's environment is restored"


def test_a_run_without_a_market_preference_asks_for_any_node_and_ends_when_it_times_out(
        monkeypatch, tags):
    starts = Starts(timeouts=1)
    monkeypatch.setattr(driver, "build_trainer", starts)
    with pytest.raises(capacity.ResourcesUnavailableError, match="nothing for any"):
        driver.fit_run(_run("scaling.start_timeout_s=45"), "r", "/tmp/unused")
    assert starts.calls == [(None, "45.0", "5.0")], "no second start, no retry by the controller"
    assert tags == [{"rn50.market": "any", "rn50.fallback_reason": ""}]


def test_when_on_demand_times_out_too_the_run_ends_naming_it(monkeypatch, tags):
    starts = Starts(timeouts=2)
    monkeypatch.setattr(driver, "build_trainer", starts)
    with pytest.raises(capacity.ResourcesUnavailableError, match="nothing for on-demand"):
        driver.fit_run(_run("scaling.prefer_spot=true"), "r", "/tmp/unused")
    assert len(starts.calls) == 2


@pytest.mark.parametrize("failures, succeeds", [(driver.START_FAILURE_RETRIES, True),
                                                (driver.START_FAILURE_RETRIES + 1, False)])
def test_a_worker_dying_while_the_group_starts_is_retried_a_few_times_not_forever(
        monkeypatch, tags, failures, succeeds):
    starts = Starts(timeouts=failures, error=lambda: WorkerGroupStartupFailedError("died"))
    monkeypatch.setattr(driver, "build_trainer", starts)
    run = _run("checkpoint.max_failures=0")  # not charged to max_failures
    if succeeds:
        assert driver.fit_run(run, "r", "/tmp/unused") == "result"
    else:
        with pytest.raises(ray.train.ControllerError, match="died"):
            driver.fit_run(run, "r", "/tmp/unused")
    assert len(starts.calls) == min(failures + 1, driver.START_FAILURE_RETRIES + 1)


def test_the_trainer_bounds_controller_retries_and_carries_the_preemption_settings(tmp_path):
    run = _run("checkpoint.max_preemption_failures=7", "checkpoint.preemption_grace_s=15",
               "checkpoint.relax_collectives_on_preemption=true")
    trainer = driver.build_trainer(run, "r", str(tmp_path), label_selector={"rn50/market": "spot"})
    failure = trainer.run_config.failure_config
    assert failure.controller_failure_limit == 0
    assert (failure.max_preemption_failures, failure.preemption_grace_s,
            failure.relax_collectives_on_preemption) == (7, 15.0, True)
    assert failure.max_failures == run.config.checkpoint.max_failures
    assert trainer.scaling_config.label_selector == {"rn50/market": "spot"}


@pytest.mark.parametrize("override, key", [
    ("scaling.start_timeout_s=0", "scaling.start_timeout_s"),
    ("scaling.spot_wait_s=-1", "scaling.spot_wait_s"),
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
