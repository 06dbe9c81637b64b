"""Ray Tune sweeps over the config: one TorchTrainer per trial, one MLflow child run per trial.

The Train V2 pattern: Tune runs `train_trial` (a driver function, reserving no CPU) per
trial; it builds the same TorchTrainer as a normal run, with `TuneReportCallback` forwarding the
workers' per-epoch metrics to Tune so ASHA can stop weak trials. `max_concurrent_trials` comes from
the cluster's resources, so Tune never starts more trial drivers than there are workers for them
(a driver waiting for workers held by another trial's driver would deadlock the sweep).
"""
from __future__ import annotations

import os

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from rn50.io import mlflow_backup, storage, tracking
from rn50.search_space import SweepSpec, trial_run_name
from rn50.distributed.sweep_report import TrialRecord, log_sweep_report
from rn50.distributed.contexts import RunContext, SweepContext
from rn50.distributed.capacity import ResourcesUnavailableError
from rn50.distributed.driver import fit_run
from rn50.distributed.ray_adapter import TUNE_LOGGERS, quiet_expected_ends
from rn50.distributed.ray_setup import init_ray
from rn50.records import TrialResult


def param_space(spec: SweepSpec) -> dict:
    """Ray Tune distributions for the sweep's dotted keys."""
    build = {"loguniform": lambda v: ray.tune.loguniform(*v),
             "uniform": lambda v: ray.tune.uniform(*v),
             "choice": ray.tune.choice, "grid": ray.tune.grid_search}
    return {key: build[dist.kind](dist.values) for key, dist in spec.space.items()}


def max_concurrent_trials(spec: SweepSpec, extra_overrides: list[str]) -> int:
    """How many trials the cluster can run at once, from one trial's worker resources."""
    scaling = spec.base_config(extra_overrides).scaling
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // (scaling.max_workers * scaling.cpus_per_worker))
    if scaling.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // scaling.max_workers))
    if fits < 1:
        raise ResourcesUnavailableError(
            f"one trial needs {scaling.max_workers} workers x {scaling.cpus_per_worker} "
            f"CPUs{' + 1 GPU' if scaling.use_gpu else ''}; the cluster has {resources}")
    return min(fits, spec.max_concurrent_trials) if spec.max_concurrent_trials else fits


def train_trial(params: dict, spec: SweepSpec, sweep: SweepContext) -> None:
    """Tune trainable: train one trial's config with Ray Train, logging to a child MLflow run."""
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    config = spec.trial_config(params, list(sweep.overrides))
    tracker, _ = tracking.start_or_resume_run(
        config, sweep.tracking_uri, sweep.trial_key(trial_id),
        trial_run_name({key: params[key] for key in spec.space}),  # in the sweep file's order
        tags={"mlflow.parentRunId": sweep.parent_run_id, "rn50.trial_id": trial_id,
              "rn50.sweep": sweep.name})
    try:
        fit_run(RunContext(config, sweep.tracking_uri, tracker.run_id),
                f"{sweep.name}-{trial_id}", sweep.trials_storage, callbacks=[TuneReportCallback()],
                sole_run_of_job=False)  # the sweep's trials share its driver's job
    except ResourcesUnavailableError:
        tracker.finish(succeeded=False)
        raise
    tracker.finish(succeeded=True)


def _tuner(spec: SweepSpec, sweep: SweepContext, concurrency: int) -> ray.tune.Tuner:
    # The trial driver only waits on its TorchTrainer: it reserves a little memory but no CPU, so
    # a trial's CPUs all go to its training workers (Tune refuses an all-zero request).
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(train_trial, spec=spec, sweep=sweep),
        {"CPU": 0, "memory": 256 * 1024 * 1024})
    filesystem, storage_path = storage.resolve_storage(sweep.storage_uri, patient=True)
    run_config = ray.tune.RunConfig(name=sweep.name, storage_path=storage_path,
                                    storage_filesystem=filesystem)
    restore_path = os.path.join(storage_path, sweep.name)
    if ray.tune.Tuner.can_restore(restore_path, storage_filesystem=filesystem):
        print(f"[rn50] resuming sweep '{sweep.name}' from {restore_path}", flush=True)
        return ray.tune.Tuner.restore(restore_path, trainable, resume_errored=True,
                                      storage_filesystem=filesystem, param_space=param_space(spec))
    return ray.tune.Tuner(trainable, param_space=param_space(spec), run_config=run_config,
                          tune_config=tune_config(spec, sweep, concurrency))


def tune_config(spec: SweepSpec, sweep: SweepContext, concurrency: int) -> ray.tune.TuneConfig:
    """The TuneConfig of a sweep: its metric and mode, ASHA (epochs as time), the searcher."""
    scheduler = None
    if spec.asha is not None:
        # One Tune iteration is one reported epoch, so grace and max_t are in epochs.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs,
                                  grace_period=spec.asha.grace_period_epochs,
                                  reduction_factor=spec.asha.reduction_factor)
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg, limit = OptunaSearch(seed=spec.seed), concurrency  # Tune wraps it in a limiter
    else:
        # The random/grid generator takes its limit itself (Tune ignores max_concurrent_trials
        # for a SearchGenerator, with only a warning).
        from ray.tune.search.basic_variant import BasicVariantGenerator
        search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrency)
        limit = None
    return ray.tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                               scheduler=scheduler, search_alg=search_alg,
                               max_concurrent_trials=limit)


def trial_status(result, epochs: int) -> str:
    """How a trial ended, read from Tune's own record of it: its error, else whether the last
    result Tune logged for it carries Tune's `done` flag before the last epoch (set when the
    scheduler decides STOP; a trial that runs to its end never has it on an earlier epoch)."""
    if result.error:
        return "errored"
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return "errored"
    last = frame.iloc[-1]
    if bool(last.get("done", False)) and int(last["training_iteration"]) < epochs:
        return "stopped_by_asha"
    return "completed"


def _records(results, spec: SweepSpec, epochs: int) -> list[TrialRecord]:
    records = []
    for result in results:
        frame = result.metrics_dataframe
        history = [] if frame is None or spec.metric not in frame else \
            list(zip(frame["epoch"].astype(int), frame[spec.metric].astype(float)))
        params = {key: result.config[key] for key in spec.space}
        # A trial that failed before its first report has no result to read an id from.
        trial = TrialResult.from_tune(result.metrics) if result.metrics else None
        records.append(TrialRecord(trial.trial_id if trial else "?", params,
                                   trial_status(result, epochs), history,
                                   trial.checkpoint_path if trial else ""))
    return records


def _mark_children(parent: tracking.Tracker, records: list[TrialRecord]) -> None:
    """Tag each child run with how its trial ended; ASHA-stopped trials become KILLED runs."""
    by_trial = parent.children("rn50.trial_id")
    for record in records:
        child = by_trial.get(record.trial_id)
        if child is None:
            continue
        child.set_tags({"rn50.trial_status": record.status})
        # Tune ends a trial's driver as soon as ASHA (or max_t) says stop, often before the driver
        # could close its own MLflow run: close it here from what Tune recorded.
        child.end({"completed": "FINISHED", "stopped_by_asha": "KILLED"}.get(record.status,
                                                                             "FAILED"))


def _raise_if_no_trial_got_resources(results, parent: tracking.Tracker) -> None:
    """End the sweep with the trials' own message when every trial failed to get resources."""
    errors = [result.error for result in results]
    if not errors or not all(isinstance(e, ResourcesUnavailableError) or
                             "ResourcesUnavailableError" in repr(e) for e in errors):
        return
    parent.end("FAILED")
    first = str(errors[0])
    # Tune wraps the trial's error in its own traceback text: keep the message from its start.
    start = first.find("the worker group did not start")
    raise ResourcesUnavailableError(f"no trial of the sweep could get its resources: "
                                    f"{first[start:] if start >= 0 else first}")


def _sweep_params(spec: SweepSpec) -> dict[str, str]:
    params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.search": spec.search,
              "sweep.num_samples": str(spec.num_samples), "sweep.base_recipe": spec.base_recipe,
              "sweep.asha": str(spec.asha)}
    params.update({f"sweep.space.{key}": f"{d.kind}{d.values}" for key, d in spec.space.items()})
    return params


def run_sweep(spec: SweepSpec, name: str, storage_uri: str,
              overrides: list[str] | None = None) -> dict:
    """Run (or resume) sweep `name`; return the best trial's params, metric and checkpoint."""
    try:
        return _sweep_and_track(spec, name, storage_uri, overrides)
    finally:  # on a cluster head, `ray down` right after the sweep must lose none of it
        mlflow_backup.backup_at_job_end()


def _sweep_and_track(spec: SweepSpec, name: str, storage_uri: str,
                     overrides: list[str] | None) -> dict:
    overrides = list(overrides or [])
    base = spec.base_config(overrides)
    tracking_uri = tracking.resolve_tracking_uri(base.tracking.uri)
    storage.refuse_job_scratch(storage_uri, tracking_uri)
    storage.preflight(storage_uri)
    parent, resumed = tracking.start_or_resume_run(
        base, tracking_uri, storage.run_uri(storage_uri, name), name,
        tags={"rn50.kind": "sweep", "git_commit": tracking.git_commit(),
              "ray_version": ray.__version__})
    if not resumed:
        parent.log_params(_sweep_params(spec))
    print(f"[rn50] sweep '{name}': MLflow parent run {parent.run_id} at {tracking_uri}", flush=True)
    init_ray(base.scaling.max_workers * base.scaling.cpus_per_worker)
    sweep = SweepContext(name=name, storage_uri=storage_uri, overrides=tuple(overrides),
                         tracking_uri=tracking_uri, parent_run_id=parent.run_id,
                         epochs=base.train.epochs)
    concurrency = max_concurrent_trials(spec, overrides)
    print(f"[rn50] sweep '{name}': at most {concurrency} trial(s) at once", flush=True)
    quiet_expected_ends(TUNE_LOGGERS)  # a trial without room: the sweep's own message says it
    results = _tuner(spec, sweep, concurrency).fit()
    _raise_if_no_trial_got_resources(results, parent)
    records = _records(results, spec, base.train.epochs)
    _mark_children(parent, records)
    best = results.get_best_result(spec.metric, spec.mode, scope="all")
    best_params = {key: best.config[key] for key in spec.space}
    best_config = spec.trial_config(best_params, overrides)
    log_sweep_report(parent, records, spec.metric, spec.mode, best_config)
    best_value = best.metrics_dataframe[spec.metric].agg(spec.mode)
    parent.log_metrics({f"best_{spec.metric}": best_value}, step=0)
    best_recipe = storage.join(storage.absolute(storage_uri), name, "best_recipe.yaml")
    storage.write_bytes(best_recipe, best_config.to_yaml().encode())
    parent.end("FINISHED")
    checkpoint = storage.from_ray_path(TrialResult.from_tune(best.metrics).checkpoint_path,
                                       storage_uri)
    return {"name": name, "metric": spec.metric, "best_value": float(best_value),
            "best_config": best_params, "best_recipe": best_recipe, "checkpoint": checkpoint,
            "mlflow_run_id": parent.run_id,
            "trials": {s: sum(r.status == s for r in records) for s in {r.status for r in records}}}
