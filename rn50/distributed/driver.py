"""The driver side of a training run: checks, MLflow, the `TorchTrainer`, the run summary.

`run_training` checks storage before anything starts, opens (or finds again) the MLflow run,
builds the `TorchTrainer` around `rn50.distributed.worker.train_loop_per_worker` (shipped through
`worker_entry`), and turns Ray's result into the `RESULT` summary. Running it again with the same
name and storage resumes the run. `fit_run` is the one place that calls `fit()` (sweep trials
too); the start policy it hands Ray Train's controller (rn50.distributed.ray_adapter) gets the
workers their nodes (spot, then on-demand), ends a run that cannot get them with
`ResourcesUnavailableError` and one whose workers hit a permanent error with `PermanentError`.
"""
from __future__ import annotations

import logging
import os
import time

import ray
import ray.train
import torch
from ray.train.torch import TorchConfig

from rn50.io import checkpoints as ckpt
from rn50.io import mlflow_backup, storage, tracking
from rn50.config import Config
from rn50.config_sections import AUTO
from rn50.data.preflight import check_data
from rn50.distributed import capacity, cluster_view, cost, ray_errors
from rn50.distributed.contexts import RunContext
from rn50.distributed.fit_ladder import Action, Outcome, RetryLadder
from rn50.distributed.ray_adapter import ElasticRunPolicy, RunPolicy, Trainer
from rn50.distributed.ray_setup import init_ray
from rn50.distributed.worker_entry import train_loop_per_worker
from rn50.errors import PermanentError
from rn50.records import EpochReport, RunSummary, StopReason

logger = logging.getLogger(__name__)


def _final_model(result_checkpoint, config: Config):
    """Rebuild the trained model from the final checkpoint (for MLflow)."""
    # Imported here: torchvision (with torch._dynamo) is ~2 s of every driver's start, and a run
    # that logs neither its model nor its gallery never needs it.
    from rn50.core.model import build_model
    with result_checkpoint.as_directory() as directory:
        state = ckpt.load_checkpoint(directory)  # verified against its manifest first
    model = build_model(config.model, config.data.num_classes)
    model.load_state_dict(state["model"])
    return model.eval()


def build_trainer(run: RunContext, name: str, storage_uri: str, callbacks: list | None = None,
                  market: str = "any") -> Trainer:
    """The Trainer for one run: scaling (first asking for `market`'s nodes), storage, failure
    handling, checkpoint retention, and rn50's start policy in its controller."""
    config = run.config
    checkpoint = config.checkpoint
    filesystem, storage_path = storage.resolve_storage(storage_uri, patient=True)
    # `auto` threads are set on each worker (worker_cpus); OMP_NUM_THREADS only starts them off.
    threads = str(config.train.torch_threads if config.train.torch_threads != AUTO
                  else config.scaling.cpus_per_worker if not config.scaling.use_gpu else 1)
    ray_scaling = ray.train.ScalingConfig(
        # A (min, max) tuple makes Ray Train's group elastic; the loop keeps the maths the same
        # at every size (rn50.data.samplers).
        num_workers=(config.scaling.min_workers, config.scaling.max_workers)
        if config.scaling.elastic else config.scaling.max_workers,
        elastic_resize_monitor_interval_s=config.scaling.resize_check_s,
        use_gpu=config.scaling.use_gpu,
        resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        accelerator_type=config.scaling.accelerator_type or None)
    policy = (ElasticRunPolicy if config.scaling.elastic else RunPolicy)(
        ray_scaling, config.scaling, capacity.worker_bundle(config.scaling),
        cluster_view.cluster_node_types(), market, run.tracker)
    return Trainer(
        train_loop_per_worker,
        train_loop_config=run,  # typed: the worker receives this RunContext as its argument
        # gloo, not Ray's NCCL default for GPU workers: _wrap_ddp adds NCCL where CUDA is real
        # (and a rehearsal's fake GPU nodes, scaling.cpu_stands_in_for_gpu, have none).
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray_scaling,
        policy=policy,
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            logging_config=ray.train.LoggingConfig(log_level=config.train.ray_log_level),
            failure_config=ray.train.FailureConfig(
                max_failures=checkpoint.max_failures,
                # Preemptions (drained nodes) have their own budget, so a week of spot reclaims
                # does not use up the one for real failures.
                max_preemption_failures=checkpoint.max_preemption_failures,
                relax_collectives_on_preemption=checkpoint.relax_collectives_on_preemption,
                preemption_grace_s=checkpoint.preemption_grace_s,
                # Starts that time out come back every scaling.start_check_s for the start
                # policy to look at; it bounds them (and ends the run), not this count.
                controller_failure_limit=-1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoint.keep_last),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": threads,
                                             "MKL_NUM_THREADS": threads}}))


def fit_run(run: RunContext, name: str, storage_uri: str, callbacks: list | None = None,
            sole_run_of_job: bool = True):
    """`fit()` until the run ends; return Ray's result. What happens after each `fit()` that
    raised is `fit_ladder.RetryLadder`'s decision: a dead Train controller (a storage outage
    kills it) is resumed from the newest checkpoint; a start that gave up raises
    `ResourcesUnavailableError`, a worker error no restart fixes `PermanentError` (the start
    policy in the controller decides both, ray_adapter), anything else Ray's own error.
    `sole_run_of_job`: no other run shares this driver's Ray job (a sweep's trials do), so a dead
    controller's leftover placement groups are this run's to remove."""
    config = run.config
    capacity.refuse_if_never_fits(config.scaling)
    market = capacity.initial_market(config.scaling)
    _tag_market(run, market)
    ladder = RetryLadder(config.checkpoint.max_failures, _progress(storage_uri, name))
    while True:
        try:
            with capacity.ray_train_env(config.scaling.start_check_s,
                                        config.checkpoint.preemption_poll_s):
                return build_trainer(run, name, storage_uri, callbacks, market).fit()
        except ray_errors.FIT_ERRORS as err:
            failure = ray_errors.classify(err)
            progress = None
            if failure.kind is Outcome.CONTROLLER:
                logger.warning("Train controller failed (%s); waiting for storage, then resuming",
                               failure.message)
                _wait_for_storage(storage_uri, timeout_s=600)
                progress = _progress(storage_uri, name)
                if sole_run_of_job:
                    _release_dead_controllers_groups()
            decision = ladder.after(failure.kind, progress)
            if decision.action is Action.GIVE_UP:
                stop = _stop_error(decision.reason, failure)
                if stop is None:
                    raise  # Ray's own error says what failed
                raise stop from err


def _release_dead_controllers_groups() -> None:
    """Free what the dead controller's worker group still reserves (capacity.py says why)."""
    try:
        removed = capacity.release_orphaned_placement_groups()
    except Exception as err:  # noqa: BLE001 - the start policy still names any holder it meets
        logger.warning("could not list this job's placement groups: %s", err)
        return
    if removed:
        logger.warning("removed %d placement group(s) the dead Train controller left reserved: %s",
                       len(removed), ", ".join(group[:12] for group in removed))


def _stop_error(reason: StopReason | None, failure: ray_errors.Failure) -> Exception | None:
    """The project's error for a run that ends on `reason` (None: Ray's own error)."""
    if reason is StopReason.NO_RESOURCES:
        return capacity.ResourcesUnavailableError(failure.message)
    if reason is StopReason.PERMANENT_ERROR:
        stop = PermanentError(failure.message)
        stop.exit_code = failure.exit_code
        return stop
    return None


def _progress(storage_uri: str, name: str) -> str | None:
    """The run's newest checkpoint (None before the first, or while storage cannot say)."""
    try:
        newest = ckpt.checkpoints_newest_first(storage.run_uri(storage_uri, name))
    except Exception as err:  # noqa: BLE001 - storage may be the very thing that failed
        logger.debug("could not list the run's checkpoints: %s", err)
        return None
    return newest[0] if newest else None


def _tag_market(run: RunContext, market: str) -> None:
    # Both, always: a resumed run that is back on spot must not keep an old fallback reason.
    run.tracker.set_tags({"rn50.market": market, "rn50.fallback_reason": ""})


def _wait_for_storage(storage_uri: str, timeout_s: float) -> None:
    """Block until the storage preflight passes again (or raise after `timeout_s`)."""
    deadline = time.time() + timeout_s
    while True:
        # A storage that just failed a write often passes one probe while still flapping: give
        # it a few seconds before the next probe and before a new controller relies on it.
        time.sleep(5)
        try:
            storage.preflight(storage_uri)
            return
        except storage.StorageError:
            if time.time() > deadline:
                raise


def run_training(config: Config, name: str, storage_uri: str) -> RunSummary:
    """Train `config` as run `name` in `storage_uri` (resuming it if it exists); return its
    summary (finished, or stopped on its budget)."""
    try:
        return _train_and_track(config, name, storage_uri)
    finally:  # on a cluster head, `ray down` right after the job must lose none of its tracking
        mlflow_backup.backup_at_job_end()


def _train_and_track(config: Config, name: str, storage_uri: str) -> RunSummary:
    since_s = time.time()
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.uri)
    storage.refuse_job_scratch(storage_uri, tracking_uri)
    storage.preflight(storage_uri)  # fail in seconds on bad keys / missing bucket, not mid-run
    _check_data(config)  # a wrong data.root ends here, not in every worker over and over
    run_key = storage.run_uri(storage_uri, name)
    spent = cost.spent_before(config, tracking_uri, run_key, name)  # a spent budget: stop here
    init_ray(config.scaling.max_workers * config.scaling.cpus_per_worker)
    basis = cost.prepare(config, since_s, spent)  # an unpriced node type: stop before MLflow
    tracker = _open_mlflow_run(config, name, storage_uri, run_key, tracking_uri)
    run_id = tracker.run_id
    with cost.CostMeter(basis, tracker, config.cost.log_every_s) as meter:
        try:
            result = fit_run(RunContext(config, tracking_uri, run_id, basis), name, storage_uri)
        except Exception:
            tracker.finish(succeeded=False)
            raise
    summary = run_summary(result, config, name, storage_uri, (tracking_uri, run_id),
                          cost_usd=meter.total_usd or 0.0, wall_s=time.time() - since_s)
    if summary.stopped is StopReason.BUDGET:
        # KILLED, not FINISHED: MLflow's status for a run stopped before its end; a rerun with a
        # higher budget sets it RUNNING again and finishes it.
        tracker.finish(succeeded=False, status="KILLED")
        return summary
    tracker.delete_tag(cost.STOPPED_TAG)  # an earlier start's stop
    model = None
    if config.tracking.log_gallery or config.tracking.log_model:
        model = _final_model(result.checkpoint, config)
    if config.tracking.log_gallery:  # the most confident mistakes, with Grad-CAM
        from rn50.serve.evaluate import log_training_gallery
        log_training_gallery(tracker, model, config)
    example = torch.zeros(1, 3, config.data.val_crop_px, config.data.val_crop_px)
    tracker.finish(succeeded=True, model=model if config.tracking.log_model else None,
                   example_input=example)
    return summary


def run_summary(result, config: Config, name: str, storage_uri: str,
                mlflow_run: tuple[str, str], cost_usd: float, wall_s: float) -> RunSummary:
    """The run's summary from Ray's final `result` (`mlflow_run`: MLflow URI and run id)."""
    # Ray's final result carries the newest checkpoint's report: the run's last, which says why
    # the run ended (the worker sets it; nothing is inferred from the epoch count).
    last = EpochReport.from_metrics(result.metrics)
    return RunSummary(
        name=name, last=last, stopped=last.stop(config.train.epochs),
        checkpoint=storage.from_ray_path(result.checkpoint.path, storage_uri),
        tracking_uri=mlflow_run[0], mlflow_run_id=mlflow_run[1], cost_usd=round(cost_usd, 4),
        wall_s=round(wall_s, 1), budget_usd=config.train.budget_usd,
        best=_best_of_run(storage_uri, name, config.checkpoint.keep_best_by))


def _check_data(config: Config) -> None:
    """The data set, checked before Ray starts (DataError, exit code 2). A local path on a
    cluster names a folder on the worker nodes, which only the workers can look at."""
    root = config.data.root
    if os.environ.get("RAY_ADDRESS") and "://" not in root and \
            config.data.dataset in ("parquet", "imagefolder"):
        print(f"[rn50] data.root={root} is a path on the worker nodes: the workers check it (a "
              "wrong one ends the run with exit code 2)", flush=True)
        return
    print(f"[rn50] data: {check_data(config.data)} in {root}", flush=True)


def _open_mlflow_run(config: Config, name: str, storage_uri: str, run_key: str,
                     tracking_uri: str) -> tracking.Tracker:
    """Start (or find again and resume) the run's MLflow run (`run_key`: `storage.run_uri`); say
    which on the console."""
    tracker, resumed = tracking.start_or_resume_run(
        config, tracking_uri, run_key, name,
        tags={"git_commit": tracking.git_commit(), "ray_version": ray.__version__,
              "torch_version": torch.__version__, "num_workers": str(config.scaling.num_workers),
              "device_type": "gpu" if config.scaling.use_gpu else "cpu",
              "storage": storage.describe_storage(storage_uri)})
    print(f"[rn50] run '{name}' in {storage.describe_storage(storage_uri)}; MLflow run "
          f"{tracker.run_id} ({'resumed' if resumed else 'new'}) at {tracking_uri}", flush=True)
    backup_problem = mlflow_backup.failed_backup_note()
    if backup_problem:  # where the operator looks: the console and the run itself
        logger.error("%s; fix it before `ray down`, or this run's tracking can be lost",
                     backup_problem)
        tracker.set_tags({"rn50.mlflow_backup_error": backup_problem})
    if config.train.budget_usd:
        tracker.set_tags({"rn50.budget_usd": config.train.budget_usd})
    return tracker


def _best_of_run(storage_uri: str, name: str, metric: str) -> dict:
    """The run's best checkpoint and its metric, for the RESULT line (nothing if it keeps none)."""
    run = storage.run_uri(storage.absolute(storage_uri), name)  # the record's one form of path
    best = ckpt.best_checkpoint(run) if metric != "none" else None
    if best is None:
        return {}
    summary = ckpt.verify(best, hashes=False)["summary"]
    return {"best_checkpoint": best, f"best_{metric}": summary.get(metric),
            "best_epoch": summary.get("epoch")}
