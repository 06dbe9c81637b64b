"""What rn50 takes from Ray Train's and Ray's internals is still there, under the same names:
red after a Ray upgrade that renames or reshapes any of it (rn50/distributed/ray_adapter.py,
cluster_view.py), before a cluster finds out."""
import inspect

from ray.train.v2._internal.execution.controller import controller
from ray.train.v2._internal.execution.controller.state import (ReschedulingState,
                                                               RestartingState)
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, ScalingPolicy
from ray.train.v2.api import data_parallel_trainer

from rn50.distributed import ray_adapter


def test_fit_hands_the_controller_a_scaling_policy_we_can_replace():
    fit = inspect.getsource(data_parallel_trainer.DataParallelTrainer.fit)
    assert "self._initialize_and_run_controller(" in fit and "scaling_policy=" in fit
    trainer = data_parallel_trainer.DataParallelTrainer
    run = inspect.signature(trainer._initialize_and_run_controller)
    assert any(p.kind == p.VAR_KEYWORD for p in run.parameters.values())
    assert "scaling_policy" in inspect.signature(controller.TrainController.__init__).parameters


def test_the_controller_asks_its_scaling_policy_for_labels_and_tells_it_every_state():
    start = inspect.getsource(controller.TrainController._start_worker_group)
    assert "on_controller_start_worker_group" in start and "self._controller_callbacks" in start
    init = inspect.getsource(controller.TrainController.__init__)
    assert "self._scaling_policy,\n" in init  # the policy is one of the controller callbacks
    set_state = inspect.getsource(controller.TrainController._set_state)
    assert "after_controller_state_update" in set_state
    for state in (ReschedulingState, RestartingState):
        assert "training_failed_error" in inspect.signature(state.__init__).parameters


def test_the_policy_overrides_exactly_the_hooks_ray_defines():
    for name in ("on_controller_start_worker_group", "after_controller_state_update",
                 "make_decision_for_non_running_worker_group",
                 "make_decision_for_running_worker_group", "_send_resource_request",
                 "_maybe_send_resource_request"):
        assert hasattr(ScalingPolicy, name), name
    assert "_latest_monitor_time" in inspect.getsource(ElasticScalingPolicy.__init__)
    assert ray_adapter.ElasticRunPolicy.__mro__.index(ray_adapter._StartControl) < \
        ray_adapter.ElasticRunPolicy.__mro__.index(ScalingPolicy)


def test_the_cluster_state_readers_exist():
    import ray._private.state as state
    import ray._private.worker as worker
    from ray._raylet import InnerGcsClient
    from ray.core.generated.autoscaler_pb2 import AutoscalingState, FailedInstanceRequest
    assert callable(state.available_resources_per_node)
    assert callable(state.state.get_draining_nodes)
    assert callable(InnerGcsClient.get_cluster_status)  # GcsClient forwards to it
    assert {"pending_instance_requests", "pending_instances", "failed_instance_requests",
            "autoscaler_state_version"} <= set(AutoscalingState.DESCRIPTOR.fields_by_name)
    failed = set(FailedInstanceRequest.DESCRIPTOR.fields_by_name)
    assert {"ray_node_type_name", "start_ts"} <= failed
    assert "get_logs_dir_path" in dir(worker.ray._private.node.Node)


def test_the_controllers_tracebacks_of_waits_and_chosen_ends_are_kept_off_the_console():
    """Every `scaling.start_check_s` a waiting start's Ray start timeout ends in the controller's
    "Error in control loop iteration" with a traceback: expected, and said by the policy's own
    "waiting for" line instead. Red if that traceback reached the console (a user reads a crash
    every few seconds of a normal wait), or if a real crash were hidden with it."""
    import logging
    import sys

    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    def record(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:  # noqa: BLE001 - a record as logger.exception makes it
            return logging.LogRecord(controller.__name__, logging.ERROR, __file__, 1,
                                     "Error in control loop iteration", None, sys.exc_info())
    assert ray_adapter._expected_end(record(WorkerGroupStartupTimeoutError(2)))
    assert ray_adapter._expected_end(record(ray_adapter.StartGaveUp("no room")))
    assert not ray_adapter._expected_end(record(RuntimeError("a real crash")))


def test_tunes_traceback_of_a_trial_without_resources_is_kept_off_the_console():
    """A sweep whose trials cannot get their CPUs ends with one message naming who holds them;
    Tune's own traceback of each such trial (logged with exc_info by its controller) is noise.
    Red if a Ray upgrade moves that log, or if another trial error were hidden with it."""
    import logging

    from ray.tune.execution import tune_controller

    from rn50.distributed.capacity import ResourcesUnavailableError
    source = inspect.getsource(tune_controller.TuneController._trial_task_failure)
    assert "logger.error(" in source and "exc_info=exception" in source
    assert (tune_controller.logger.name,) == ray_adapter.TUNE_LOGGERS

    def record(error: Exception) -> logging.LogRecord:
        return logging.LogRecord(tune_controller.logger.name, logging.ERROR, __file__, 1,
                                 "Trial task failed", None, (type(error), error, None))
    assert not ray_adapter._keep_unexpected(record(ResourcesUnavailableError("no room")))
    assert ray_adapter._keep_unexpected(record(RuntimeError("a trial's real crash")))
