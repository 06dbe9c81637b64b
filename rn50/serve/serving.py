"""The MLflow pyfunc model that `python -m rn50.export mlflow` writes and `mlflow models serve`
serves: uint8 RGB images [N, 3, H, W] in (any H, W: resized and center-cropped as validation
does), one row per image out with the top class, its probability and the top-5 names.

    mlflow models serve -m exports/mlflow_model --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[[0, 0, ...], ...], ...]]}'
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2 as T

from rn50.config import ModelConfig
from rn50.serve.inference import Classifier
from rn50.core.model import build_model

TOP_K = 5


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Weights (`weights`: state_dict) + `model.json` (arch, class names, crop sizes)."""

    def load_context(self, context) -> None:
        """Rebuild the network from the model's artifacts."""
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        names = list(meta["class_names"])
        model = build_model(ModelConfig(arch=meta["arch"]), len(names))
        model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu",
                                         weights_only=True))
        self.classifier = Classifier(model.eval(), names, meta["resize_px"], meta["crop_px"],
                                     meta.get("class_wnids"))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Top-1 label, index and probability, plus the top-5 labels and probabilities."""
        batch = _as_batch(model_input, self.classifier.resize_px, self.classifier.crop_px)
        probs = self.classifier.probabilities(batch)
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        names = self.classifier.class_names
        rows = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            rows.append({"label": names[indices[0]], "class_index": indices[0],
                         "probability": values[0], "top5_labels": [names[i] for i in indices],
                         "top5_probabilities": values})
        return pd.DataFrame(rows)


def _as_batch(model_input, resize_px: int, crop_px: int) -> torch.Tensor:
    """Validate the served input and bring it to uint8 [N, 3, crop, crop]."""
    array = np.asarray(model_input.to_numpy() if isinstance(model_input, pd.DataFrame)
                       else model_input)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images shaped [N, 3, H, W], got {array.shape}")
    batch = torch.from_numpy(np.ascontiguousarray(array.astype(np.uint8, copy=False)))
    if batch.shape[-2:] != (crop_px, crop_px):
        batch = T.CenterCrop(crop_px)(T.Resize(resize_px, antialias=True)(batch))
    return batch


def example_input(crop_px: int) -> np.ndarray:
    """A one-image uint8 batch at the model's crop size (a mid-grey square)."""
    return np.full((1, 3, crop_px, crop_px), 128, dtype=np.uint8)
