"""MLflow tracking: one MLflow run per training run, resumed (not duplicated) after a restart.

The driver opens the run and logs what is known before training (params, tags, the resolved
recipe); rank 0 of the worker group logs per-epoch metrics with step=epoch; the driver closes the
run with the training curves and the final model. A run is found again by the tag
`rn50.run_key` = "<storage>/<name>", which is exactly what makes a Ray Train run resumable.
"""
from __future__ import annotations

import io
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from rn50.config import Config
from rn50.records import EpochReport

RUN_KEY_TAG = "rn50.run_key"
CURVE_METRICS = tuple(EpochReport.mlflow_name(field)  # the names the worker logs them by
                      for field in ("train_loss", "val_top1", "val_top5", "lr"))


def resolve_tracking_uri(configured: str = "") -> str:
    """The tracking URI: the config's, else $MLFLOW_TRACKING_URI, else ./mlflow.db (sqlite)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep a local store's artifacts beside its database, not relative to whatever cwd is.
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown' outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def latest_metric(tracking_uri: str, experiment: str, run_key: str,
                  key: str) -> tuple[float, int] | None:
    """(value, step) of the newest `key` of the run tagged `run_key`; None if either is missing.
    Reads only: it creates no experiment and touches no run."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    escaped = run_key.replace("'", "\\'")
    runs = client.search_runs([found.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    history = client.get_metric_history(runs[0].info.run_id, key) if runs else []
    if not history:
        return None
    newest = max(history, key=lambda m: (m.step, m.timestamp))
    return newest.value, newest.step


def start_or_resume_run(config: Config, tracking_uri: str, run_key: str, run_name: str,
                        tags: dict[str, str]) -> tuple[str, bool]:
    """(run_id, resumed): the MLflow run tagged `run_key`, or a new one with params logged."""
    client = MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, config.tracking.experiment, tracking_uri)
    escaped = run_key.replace("'", "\\'")
    found = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "rn50.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    params = [Param(key, str(value)) for key, value in sorted(config.flat().items())]
    for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    client.log_text(run.info.run_id, config.to_yaml(), "recipe.yaml")
    return run.info.run_id, False


def log_params(tracking_uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log extra params (at most 100) on a run."""
    batch = [Param(key, str(value)) for key, value in params.items()]
    MlflowClient(tracking_uri).log_batch(run_id, params=batch)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log a dict of metrics at `step` (the epoch) in one request."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    MlflowClient(tracking_uri).log_batch(run_id, metrics=batch)


def logged_steps(tracking_uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which a run already has metric `key`."""
    return {metric.step for metric in MlflowClient(tracking_uri).get_metric_history(run_id, key)}


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set several tags on a run."""
    MlflowClient(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def delete_tag(tracking_uri: str, run_id: str, key: str) -> None:
    """Remove a tag from a run if it has it."""
    client = MlflowClient(tracking_uri)
    if key in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, key)


def curves_png(tracking_uri: str, run_id: str) -> bytes:
    """A 2×2 PNG of loss, top-1, top-5 and LR against epoch, from the run's metric history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient(tracking_uri)
    figure, axes = plt.subplots(2, 2, figsize=(9, 6))
    for axis, key in zip(axes.flat, CURVE_METRICS):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        axis.plot([m.step for m in history], [m.value for m in history], marker="o")
        axis.set_title(key)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def finish_run(tracking_uri: str, run_id: str, succeeded: bool, model=None,
               example_input=None, status: str = "") -> None:
    """Log the curves PNG and (optionally) the final model, then mark the run finished/failed
    (or `status`: KILLED for a run stopped before its end that a rerun continues)."""
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        curves = Path(tmp) / "training_curves.png"
        curves.write_bytes(curves_png(tracking_uri, run_id))
        client.log_artifact(run_id, str(curves))
    if model is not None:
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            # MLflow's safe format, a torch.export program (no pickle to trust when it is
            # loaded). torch.export fixes every dimension whose example size is 1, so the
            # example holds two images: the logged model takes any batch size.
            example = example_input.expand(2, *example_input.shape[1:]).contiguous()
            with torch.no_grad():
                signature = mlflow.models.infer_signature(example.numpy(), model(example).numpy())
            mlflow.pytorch.log_model(model, name="model", signature=signature,
                                     input_example=example.numpy(), serialization_format="pt2",
                                     pip_requirements=["torch==2.14.1", "torchvision==0.29.1"])
    client.set_terminated(run_id, status or ("FINISHED" if succeeded else "FAILED"))
