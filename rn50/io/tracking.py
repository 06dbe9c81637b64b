"""MLflow tracking: one MLflow run per training run, resumed (not duplicated) after a restart.

The driver opens the run and logs what is known before training (params, tags, the resolved
recipe); rank 0 of the worker group logs per-epoch metrics with step=epoch; the driver closes the
run with the training curves and the final model. A run is found again by the tag
`rn50.run_key` = "<storage>/<name>", which is exactly what makes a Ray Train run resumable.

Every call rn50 makes to MLflow goes through this module: a `Tracker` is one run and the one
client that reaches it (no other module builds an `MlflowClient`). MLflow itself is imported only
when a tracker first talks to it, so handing a tracker to Ray's controller costs no import.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rn50.config import Config
from rn50.records import EpochReport

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

RUN_KEY_TAG = "rn50.run_key"
CURVE_METRICS = tuple(EpochReport.mlflow_name(field)  # the names the worker logs them by
                      for field in ("train_loss", "val_top1", "val_top5", "lr"))


def resolve_tracking_uri(configured: str = "") -> str:
    """The tracking URI: the config's, else $MLFLOW_TRACKING_URI, else ./mlflow.db (sqlite)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient  # heavy: only when MLflow is really reached
    return MlflowClient(tracking_uri or None)  # "" (or None): MLflow's own default URI


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep a local store's artifacts beside its database, not relative to whatever cwd is.
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown' outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _find_run(client: MlflowClient, experiment_id: str, run_key: str):
    """The newest run tagged `run_key` in the experiment, or None."""
    escaped = run_key.replace("'", "\\'")
    found = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def latest_metric(tracking_uri: str, experiment: str, run_key: str,
                  key: str) -> tuple[float, int] | None:
    """(value, step) of the newest `key` of the run tagged `run_key`; None if either is missing.
    Reads only: it creates no experiment and touches no run."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    run = _find_run(client, found.experiment_id, run_key) if found is not None else None
    history = Tracker(tracking_uri, run.info.run_id, client).metric_history(key) if run else []
    if not history:
        return None
    newest = max(history, key=lambda m: (m.step, m.timestamp))
    return newest.value, newest.step


def start_or_resume_run(config: Config, tracking_uri: str, run_key: str, run_name: str,
                        tags: dict[str, str]) -> tuple[Tracker, bool]:
    """(tracker, resumed): the MLflow run tagged `run_key`, or a new one with params logged."""
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, config.tracking.experiment, tracking_uri)
    found = _find_run(client, experiment_id, run_key)
    if found is not None:
        tracker = Tracker(tracking_uri, found.info.run_id, client)
        client.update_run(tracker.run_id, status="RUNNING")
        tracker.set_tags({"rn50.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return tracker, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    tracker = Tracker(tracking_uri, run.info.run_id, client)
    params = sorted(config.flat().items())
    for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        tracker.log_params(dict(params[start:start + 100]))
    client.log_text(tracker.run_id, config.to_yaml(), "recipe.yaml")
    return tracker, False


def model_run_id(model_uri: str, tracking_uri: str = "") -> str:
    """The run that produced an MLflow model URI (`runs:/`, `models:/name/version`, `@alias`,
    `models:/m-<id>`), or "" if it cannot be told."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/", 1)[0]
    client = _client(tracking_uri)
    name = model_uri[len("models:/"):].strip("/")
    if name.startswith("m-"):
        return client.get_logged_model(name.split("/", 1)[0]).source_run_id or ""
    if "@" in name:
        model_name, alias = name.split("@", 1)
        return client.get_model_version_by_alias(model_name, alias).run_id or ""
    model_name, _, version = name.rpartition("/")
    if not model_name:
        return ""
    return client.get_model_version(model_name, version).run_id or ""


class Tracker:
    """One MLflow run and the one client that reaches it: what rn50 logs, tags and ends a run with.

    It crosses the Ray boundary as its URI and run id; the client is built again where it is
    first used."""

    def __init__(self, tracking_uri: str, run_id: str, client: MlflowClient | None = None):
        self.tracking_uri, self.run_id, self._client = tracking_uri, run_id, client

    @classmethod
    def new_run(cls, tracking_uri: str, experiment: str, run_name: str,
                tags: dict[str, str]) -> Tracker:
        """A new run in `experiment` (created if missing), not tied to a storage key."""
        client = _client(tracking_uri)
        run = client.create_run(_experiment_id(client, experiment, tracking_uri),
                                run_name=run_name, tags=tags)
        return cls(tracking_uri, run.info.run_id, client)

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, {self.run_id!r})"

    @property
    def client(self) -> MlflowClient:
        """The MLflow client of this run, built on first use."""
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float, node: str):
        """MLflow's own sampler of this machine's CPU/GPU/memory, logging to the run under
        system/<node>/... while the block runs."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop notes
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s,
                                       resume_logging=True, node_id=node,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def children(self, key_tag: str) -> dict[str, Tracker]:
        """This run's child runs (tagged `mlflow.parentRunId`), by the value of their tag
        `key_tag`."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_runs([experiment_id],
                                        f"tags.`mlflow.parentRunId` = '{self.run_id}'")
        return {run.data.tags.get(key_tag): Tracker(self.tracking_uri, run.info.run_id,
                                                    self.client) for run in found}

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (at most 100) on the run."""
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log a dict of metrics at `step` (the epoch) in one request."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in metrics.items()])

    def metric_history(self, key: str) -> list:
        """Every logged value of metric `key` (MLflow Metric objects)."""
        return self.client.get_metric_history(self.run_id, key)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run already has metric `key`."""
        return {metric.step for metric in self.metric_history(key)}

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set several tags on the run."""
        from mlflow.entities import RunTag
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def delete_tag(self, key: str) -> None:
        """Remove a tag from the run if it has it."""
        if key in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, key)

    def log_bytes(self, data: bytes, artifact_file: str) -> str:
        """Log `data` as the run's artifact `artifact_file`; return the artifact path."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / artifact_file
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path))
        return artifact_file

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """Log a table (columns) as a JSON artifact MLflow shows as a table."""
        self.client.log_table(self.run_id, data, artifact_file)

    def download_artifact(self, path: str, destination: str) -> Path:
        """Copy the run's artifact `path` into the local folder `destination`."""
        return Path(self.client.download_artifacts(self.run_id, path, destination))

    def end(self, status: str) -> None:
        """Mark the run ended with MLflow status `status` (FINISHED, FAILED, KILLED)."""
        self.client.set_terminated(self.run_id, status)

    def curves_png(self) -> bytes:
        """A 2×2 PNG of loss, top-1, top-5 and LR against epoch, from the run's metric history."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(2, 2, figsize=(9, 6))
        for axis, key in zip(axes.flat, CURVE_METRICS):
            history = sorted(self.metric_history(key), key=lambda m: m.step)
            axis.plot([m.step for m in history], [m.value for m in history], marker="o")
            axis.set_title(key)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        return buffer.getvalue()

    def finish(self, succeeded: bool, model: nn.Module | None = None, example_input=None,
               status: str = "") -> None:
        """Log the curves PNG and (optionally) the final model, then mark the run finished/failed
        (or `status`: KILLED for a run stopped before its end that a rerun continues)."""
        self.log_bytes(self.curves_png(), "training_curves.png")
        if model is not None:
            self._log_model(model, example_input)
        self.end(status or ("FINISHED" if succeeded else "FAILED"))

    def _log_model(self, model: nn.Module, example_input) -> None:
        import mlflow
        import torch

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            # MLflow's safe format, a torch.export program (no pickle to trust when it is
            # loaded). torch.export fixes every dimension whose example size is 1, so the
            # example holds two images: the logged model takes any batch size.
            example = example_input.expand(2, *example_input.shape[1:]).contiguous()
            with torch.no_grad():
                signature = mlflow.models.infer_signature(example.numpy(), model(example).numpy())
            mlflow.pytorch.log_model(model, name="model", signature=signature,
                                     input_example=example.numpy(), serialization_format="pt2",
                                     pip_requirements=["torch==2.14.1", "torchvision==0.29.1"])
