"""Trained models for inference, from a checkpoint (local or s3://) or an MLflow model URI.

`load_model(uri)` accepts a checkpoint directory (`.../checkpoint_*`, as `rn50.io.checkpoints`
writes it), a run directory (its newest checkpoint is used), either of those on S3 (copied
to a verified local cache first), or `runs:/<run id>/model`, `models:/<name>/<version>`,
`models:/<name>@<alias>`, `models:/m-<id>` (the model a training run logged, which takes
normalized float NCHW input; its run's `recipe.yaml` supplies the class count and crop sizes).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from rn50.io import storage
from rn50.io.tracking import Tracker, model_run_id
from rn50.io.checkpoints import CheckpointError, download, load_checkpoint
from rn50.config import Config, ConfigError, ModelConfig, apply_overrides
from rn50.data.datasets import DataError
from rn50.data.class_names import imagenet_names, imagenet_wnids, readable_classes
from rn50.data.small_datasets import DIGITS_CLASSES, IMAGENETTE_SYNSETS
from rn50.serve.inference import Classifier
from rn50.core.model import build_model
from rn50.records import CheckpointExtras

log = logging.getLogger(__name__)

MLFLOW_PREFIXES = ("runs:/", "models:/")


class ArtifactError(RuntimeError):
    """A model URI that cannot be loaded; the message says what to pass instead."""


# What a user can fix (a wrong URI, missing data, bad keys): CLIs print these, no traceback.
USER_ERRORS = (ArtifactError, CheckpointError, ConfigError, DataError, storage.StorageError)


@dataclass
class LoadedModel:
    """A model ready for inference and what is known about where it came from."""
    classifier: Classifier
    config: Config | None
    arch: str
    source: str
    weights: str  # "model", "ema" or "mlflow"
    mlflow_run_id: str = ""

    @property
    def model(self) -> nn.Module:
        """The bare network (normalized float NCHW in, logits out), in eval mode."""
        return self.classifier.model


def _labels_from_data(data_cfg) -> list[str] | None:
    """The class labels (wnids, folder names, digits) the data config's classes have."""
    if data_cfg.dataset == "digits":
        return list(DIGITS_CLASSES)
    if data_cfg.dataset == "imagenette":
        return sorted(IMAGENETTE_SYNSETS)
    train = Path(os.path.expanduser(data_cfg.root)) / "train"
    if data_cfg.dataset == "imagefolder" and train.is_dir():
        return sorted(e.name for e in os.scandir(train) if e.is_dir() and e.name[0] != ".")
    return None


def class_labels_for(config: Config,
                     state: dict[str, Any] | None = None) -> tuple[list[str], list[str] | None]:
    """(readable class names, ImageNet wnids or None): the checkpoint's own, else derived from
    the data config, else ImageNet-1k's for 1000 classes, else "0".."N-1".

    Checkpoints written before names were readable hold wnids as `class_names`: they are
    mapped to names here, so every consumer (demo, gallery, exports) shows names."""
    count = config.data.num_classes
    saved = CheckpointExtras.from_state(state) if state else CheckpointExtras()
    labels = saved.class_names or _labels_from_data(config.data)
    if labels is None and count == 1000:
        labels = imagenet_wnids()
    if not labels or len(labels) != count:
        if labels:
            log.warning("found %d class names for %d classes; using indices", len(labels), count)
        return [str(i) for i in range(count)], None
    names, wnids = readable_classes(list(labels))
    saved_wnids = saved.class_wnids
    return names, list(saved_wnids) if saved_wnids and len(saved_wnids) == count else wnids


def class_names_for(config: Config, state: dict[str, Any] | None = None) -> list[str]:
    """The readable class names of `class_labels_for`."""
    return class_labels_for(config, state)[0]


def _config(raw: dict, overrides: list[str]) -> Config:
    return Config.from_dict(apply_overrides(raw, overrides))


def _from_checkpoint(uri: str, ema: bool, overrides: list[str], latest: bool) -> LoadedModel:
    directory = download(uri, latest=latest)
    state = load_checkpoint(directory)
    config = _config(state["config"], overrides)
    if ema and state.get("ema") is None:
        raise ArtifactError(f"checkpoint {uri} has no EMA weights (it was trained with "
                            "train.ema_decay=0): drop the EMA option")
    model = build_model(config.model, config.data.num_classes)
    model.load_state_dict(state["ema"] if ema else state["model"])
    names, wnids = class_labels_for(config, state)
    classifier = Classifier(model.eval(), names, config.data.val_resize_px,
                            config.data.val_crop_px, wnids)
    return LoadedModel(classifier, config, config.model.arch, str(directory),
                       "ema" if ema else "model")


def _eager_copy(logged: nn.Module, config: Config | None) -> tuple[nn.Module, str]:
    """The logged network rebuilt as a plain eager ResNet with the same weights, and its arch.

    A training run logs a torch.export program (MLflow's safe format): its modules cannot be
    hooked for Grad-CAM, and one logged elsewhere may be fixed to its example's batch size, so
    only its weights are kept.
    """
    weights = logged.state_dict()
    arch = config.model.arch if config else \
        ("resnet50d" if "conv1.0.weight" in weights else "resnet50")
    if "fc.weight" not in weights:
        raise ArtifactError("the MLflow model is not a ResNet-50 trained by rn50 (it has no "
                            "fc layer): pass a model logged by a training run")
    model = build_model(config.model if config else ModelConfig(arch=arch),
                        weights["fc.weight"].shape[0])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ArtifactError(f"the MLflow model's weights do not fit a {arch}: {err}") from None
    return model.eval(), arch


def _run_recipe(run: Tracker, overrides: list[str]) -> Config | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            raw = yaml.safe_load(run.download_artifact("recipe.yaml", tmp).read_text())
        except Exception as err:  # noqa: BLE001 - an MLflow model still works without it
            log.warning("run %s has no usable recipe.yaml (%s); using defaults", run.run_id, err)
            return None
    return _config(raw, overrides)  # a bad override is the user's to fix: not swallowed


def _from_mlflow(uri: str, tracking_uri: str, overrides: list[str]) -> LoadedModel:
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    run_id = model_run_id(uri, tracking_uri)
    config = _run_recipe(Tracker(tracking_uri, run_id), overrides) if run_id else None
    model, arch = _eager_copy(mlflow.pytorch.load_model(uri, map_location="cpu"), config)
    if config is not None:
        names, wnids = class_labels_for(config)
        classifier = Classifier(model, names, config.data.val_resize_px,
                                config.data.val_crop_px, wnids)
    elif model.fc.out_features == 1000:
        classifier = Classifier(model, imagenet_names(), 256, 224, imagenet_wnids())
    else:
        classifier = Classifier(model, [str(i) for i in range(model.fc.out_features)], 256, 224)
    return LoadedModel(classifier, config, arch, uri, "mlflow", run_id)


LATEST_HELP = ("with a run directory, use its newest checkpoint instead of its best "
               "(checkpoint.keep_best_by)")


def load_model(uri: str, ema: bool = False, overrides: list[str] | None = None,
               tracking_uri: str = "", latest: bool = False) -> LoadedModel:
    """Load a checkpoint (local/s3://; a run directory gives its best checkpoint, or its newest
    with `latest`; EMA weights if asked) or an MLflow model for inference."""
    if uri.startswith(MLFLOW_PREFIXES):
        if ema:
            raise ArtifactError("EMA weights live only in checkpoints; pass a checkpoint "
                                "directory instead of an MLflow model URI, or drop the EMA option")
        return _from_mlflow(uri, tracking_uri, overrides or [])
    return _from_checkpoint(uri, ema, overrides or [], latest)
