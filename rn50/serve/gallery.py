"""The misclassification gallery: a PNG grid of a model's most confident mistakes on a data set,
each shown beside its Grad-CAM overlay for the (wrong) predicted class, with both labels.

`log_gallery(...)` is what the end of training calls; the evaluate job collects mistakes over
all its shards and calls `render_gallery` + `log_png` itself.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rn50.io.tracking import Tracker
from rn50.serve.inference import gradcam, normalize, overlay, upscale

GALLERY_FILE = "misclassified.png"


@dataclass(frozen=True)
class Mistake:
    """One misclassified sample: its index in the data set, true and predicted class."""
    index: int
    label: int
    predicted: int
    confidence: float


class IndexedDataset(Dataset):
    """(image, label, index) from a dataset of (image, label) or None (undecodable)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        sample = self.dataset[index]
        return None if sample is None else (sample[0], sample[1], index)


def collate_indexed(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack decodable samples into (uint8 images, labels, dataset indices, skipped count)."""
    good = [sample for sample in batch if sample is not None]
    if not good:
        return (torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                torch.empty(0, dtype=torch.int64), len(batch))
    return (torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]),
            torch.tensor([s[2] for s in good]), len(batch) - len(good))


def most_confident(mistakes: list[Mistake], limit: int) -> list[Mistake]:
    """The `limit` mistakes the model was surest of (ties broken by index, so it is stable)."""
    return sorted(mistakes, key=lambda m: (-m.confidence, m.index))[:limit]


def mistakes_in_batch(probs: torch.Tensor, labels: torch.Tensor,
                      indices: torch.Tensor) -> list[Mistake]:
    """The wrong top-1 predictions of one batch of probabilities [N, classes]."""
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    return [Mistake(int(indices[i]), int(labels[i]), int(predicted[i]), float(confidence[i]))
            for i in wrong]


def strided_indices(size: int, max_samples: int) -> range:
    """Every k-th index so at most `max_samples` are taken, spread over a class-sorted set."""
    step = 1 if max_samples <= 0 else max(1, math.ceil(size / max_samples))
    return range(0, size, step)


@torch.no_grad()
def collect_mistakes(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
                     limit: int = 16, max_samples: int = 2000,
                     batch_size: int = 64) -> tuple[list[Mistake], int]:
    """Scan up to `max_samples` samples; return the `limit` most confident mistakes and #scanned."""
    model.eval()
    loader = DataLoader(IndexedDataset(dataset, strided_indices(len(dataset), max_samples)),
                        batch_size=batch_size, collate_fn=collate_indexed)
    found: list[Mistake] = []
    scanned = 0
    for images, labels, indices, _ in loader:
        if labels.numel() == 0:
            continue
        probs = model(normalize(images.to(device))).float().softmax(dim=1).cpu()
        found = most_confident(found + mistakes_in_batch(probs, labels, indices), limit)
        scanned += labels.numel()
    return found, scanned


def render_gallery(model: nn.Module, dataset: Dataset, mistakes: list[Mistake],
                   class_names: list[str], device: torch.device | str = "cpu",
                   scanned: int = 0, columns: int = 4) -> bytes:
    """A PNG grid: per mistake the image and its Grad-CAM overlay, titled true / predicted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(mistakes) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.0 * rows + 0.6),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    if mistakes:
        images = torch.stack([dataset[m.index][0] for m in mistakes])
        heatmaps = gradcam(model, normalize(images.to(device)), [m.predicted for m in mistakes])
        for axis, mistake, image, heatmap in zip(axes.flat, mistakes, images, heatmaps):
            plain = image.permute(1, 2, 0).numpy()
            axis.imshow(upscale(np.concatenate([plain, overlay(image, heatmap)], axis=1), 128),
                        interpolation="nearest")
            axis.set_title(f"true: {class_names[mistake.label]}\npred: "
                           f"{class_names[mistake.predicted]} ({100 * mistake.confidence:.0f}%)",
                           fontsize=9)
    else:
        axes.flat[0].text(0.0, 0.5, "no mistakes", fontsize=14)
    of = f" of {scanned} images" if scanned else ""
    figure.suptitle(f"{len(mistakes)} most confident mistakes{of} (left: image, right: Grad-CAM "
                    "of the predicted class)", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def gallery_png(model: nn.Module, dataset: Dataset, class_names: list[str],
                device: torch.device | str = "cpu", limit: int = 16,
                max_samples: int = 2000) -> bytes:
    """Collect the most confident mistakes and render them (see `render_gallery`)."""
    mistakes, scanned = collect_mistakes(model, dataset, device, limit, max_samples)
    return render_gallery(model, dataset, mistakes, class_names, device, scanned)


def log_png(tracker: Tracker, png: bytes, artifact_file: str = GALLERY_FILE) -> str:
    """Log PNG bytes as an artifact of an MLflow run; return the artifact path."""
    return tracker.log_bytes(png, artifact_file)


def log_gallery(tracker: Tracker, model: nn.Module, val_dataset: Dataset,
                class_names: list[str], device: torch.device | str = "cpu", limit: int = 16,
                max_samples: int = 2000) -> str:
    """Render the misclassification gallery on `val_dataset` and log it to an MLflow run."""
    model = model.to(device)
    png = gallery_png(model, val_dataset, class_names, device, limit, max_samples)
    return log_png(tracker, png)
