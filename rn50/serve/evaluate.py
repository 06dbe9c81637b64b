"""Evaluation of a trained model: top-1/top-5 on its validation set, sharded, logged to MLflow.

`python ray_jobs/evaluate.py --checkpoint URI` is the job; this module is its plain-PyTorch core
(no Ray). Shard r of W takes samples r, r+W, r+2W, ...: disjoint, covering the set exactly, so
the counts the shards return add up to the exact full-set metrics. Each shard also returns its
most confident mistakes, from which the driver renders the misclassification gallery.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rn50.serve.artifacts import LATEST_HELP, ArtifactError, LoadedModel, load_model
from rn50.config_sections import AUTO
from rn50.core.engine import evaluation_loop
from rn50.data.cpu_budget import plan_cpus
from rn50.data.loaders import build_val_dataset, dataset_classes
from rn50.data.datasets import DataError
from rn50.io import storage
from rn50.io.tracking import Tracker
from rn50.serve.gallery import (IndexedDataset, Mistake, collate_indexed, log_gallery, log_png,
                          mistakes_in_batch, most_confident, render_gallery)

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "rn50-eval"


@dataclass(frozen=True)
class EvalSpec:
    """Everything a shard task needs to rebuild the model and data (picklable, hashable)."""
    checkpoint: str
    ema: bool = False
    latest: bool = False
    tta_flip: bool = False
    overrides: tuple[str, ...] = ()
    tracking_uri: str = ""
    batch_size: int = 64
    threads: int = 1
    gallery_size: int = 16


@dataclass
class ShardResult:
    """Counts over one shard (or, after `merge`, over all of them)."""
    images: int = 0
    top1: int = 0
    top5: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    seconds: float = 0.0
    mistakes: list[Mistake] = field(default_factory=list)


def log_training_gallery(tracker: Tracker, model: nn.Module, config,
                         class_names: list[str] | None = None, max_samples: int = 2000) -> str:
    """End of training: log the gallery of `model` on the run's validation set to its run.

    Returns the artifact path, or "" (with a warning) when the validation data cannot be read
    on this machine: a finished training run must not fail over its gallery.
    """
    try:
        dataset = build_val_dataset(config.data)
    except (DataError, OSError) as err:
        log.warning("no misclassification gallery: validation data unavailable here (%s)", err)
        return ""
    names = class_names or dataset_classes(dataset)[0]  # readable, from the data's own labels
    return log_gallery(tracker, model.cpu().eval(), dataset, names,
                       max_samples=max_samples)


@lru_cache(maxsize=2)
def prepare(spec: EvalSpec) -> tuple[LoadedModel, Dataset]:
    """The model and validation set for `spec`, loaded once per process."""
    loaded = load_model(spec.checkpoint, spec.ema, list(spec.overrides), spec.tracking_uri,
                        latest=spec.latest)
    if loaded.config is None:
        raise ArtifactError(f"{spec.checkpoint} comes with no recipe, so its validation set is "
                            "unknown: evaluate its checkpoint, or the run's logged model")
    return loaded, build_val_dataset(loaded.config.data)


@torch.no_grad()
def evaluate_shard(model: nn.Module, dataset: Dataset, shard: int = 0, num_shards: int = 1,
                   device: torch.device | str = "cpu", batch_size: int = 64,
                   tta_flip: bool = False, gallery_size: int = 16,
                   loader_workers: int = 0) -> ShardResult:
    """Top-1/top-5 hits, summed loss and the most confident mistakes over one shard."""
    start, mistakes = time.perf_counter(), []
    loader = DataLoader(IndexedDataset(dataset, range(shard, len(dataset), num_shards)),
                        batch_size=batch_size, num_workers=loader_workers,
                        collate_fn=collate_indexed)

    def keep_mistakes(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        found = mistakes_in_batch(logits.softmax(dim=1).cpu(), labels.cpu(), indices)
        mistakes[:] = most_confident(mistakes + found, gallery_size)

    # Training's validation loop, so the job's figures are computed as the run's were.
    totals = evaluation_loop(model, loader, torch.device(device), tta_flip=tta_flip,
                             on_batch=keep_mistakes)
    return ShardResult(images=totals.images, top1=int(totals.top1), top5=int(totals.top5),
                       loss_sum=float(totals.loss_sum), skipped=int(totals.skipped),
                       seconds=time.perf_counter() - start, mistakes=mistakes)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def evaluate_shard_job(spec: EvalSpec, shard: int, num_shards: int) -> ShardResult:
    """What one worker (a Ray task, or this process) runs: load, then evaluate shard `shard`."""
    torch.set_num_threads(spec.threads)
    loaded, dataset = prepare(spec)
    device = _device()
    # The training run's loader workers; `auto` sized from this job's own CPUs, as a worker's.
    loaders = plan_cpus(AUTO, loaded.config.data.loader_workers, spec.threads, 1, spec.threads,
                        trains_on_gpu=device.type == "cuda").loader_workers
    return evaluate_shard(loaded.model.to(device), dataset, shard, num_shards, device,
                          spec.batch_size, spec.tta_flip, spec.gallery_size, loaders)


def local_map(spec: EvalSpec, shards: list[tuple[int, int]]) -> list[ShardResult]:
    """Run the shards one after another in this process (no Ray)."""
    return [evaluate_shard_job(spec, shard, count) for shard, count in shards]


def merge(results: list[ShardResult], gallery_size: int = 16) -> ShardResult:
    """Add up shard counts; keep the overall most confident mistakes."""
    total = ShardResult()
    for part in results:
        total.images += part.images
        total.top1 += part.top1
        total.top5 += part.top5
        total.loss_sum += part.loss_sum
        total.skipped += part.skipped
        total.seconds = max(total.seconds, part.seconds)
        total.mistakes = most_confident(total.mistakes + part.mistakes, gallery_size)
    return total


def metrics(result: ShardResult) -> dict[str, float]:
    """Top-1 / top-5 in percent, mean loss, and image counts."""
    count = max(result.images, 1)
    return {"top1": 100.0 * result.top1 / count, "top5": 100.0 * result.top5 / count,
            "loss": result.loss_sum / count, "images": result.images, "skipped": result.skipped}


def log_evaluation(tracking_uri: str, experiment: str, spec: EvalSpec, loaded: LoadedModel,
                   workers: int, summary: dict, gallery: bytes) -> str:
    """Record one evaluation as an MLflow run (params, eval/* metrics, gallery); return its id."""
    tags = {"rn50.kind": "evaluation", "rn50.source": spec.checkpoint}
    if loaded.mlflow_run_id:
        tags["rn50.evaluated_run_id"] = loaded.mlflow_run_id
    tracker = Tracker.new_run(tracking_uri, experiment,
                              f"eval-{Path(spec.checkpoint.rstrip('/')).name}", tags)
    data = loaded.config.data
    params = {"checkpoint": spec.checkpoint, "weights": loaded.weights, "tta_flip": spec.tta_flip,
              "workers": workers, "arch": loaded.arch, "data.dataset": data.dataset,
              "data.root": data.root, "data.val_crop_px": data.val_crop_px,
              "data.max_val_samples": data.max_val_samples}
    tracker.log_params(params)
    tracker.log_metrics({f"eval/{k}": summary[k]
                         for k in ("top1", "top5", "loss", "images", "skipped")}, step=0)
    log_png(tracker, gallery)
    tracker.end("FINISHED")
    return tracker.run_id


ShardMap = Callable[[EvalSpec, list[tuple[int, int]]], list[ShardResult]]


def run_evaluation(spec: EvalSpec, map_shards: ShardMap = local_map, workers: int = 1,
                   tracking_uri: str = "", experiment: str = DEFAULT_EXPERIMENT) -> dict:
    """Evaluate over `workers` shards via `map_shards`, render the gallery, log to MLflow."""
    start = time.time()
    total = merge(map_shards(spec, [(i, workers) for i in range(workers)]), spec.gallery_size)
    if total.images == 0:
        raise DataError(f"no image of the validation set could be decoded ({total.skipped} "
                        "skipped): check data.root")
    loaded, dataset = prepare(spec)
    device = _device()
    gallery = render_gallery(loaded.model.to(device), dataset, total.mistakes,
                             loaded.classifier.class_names, device, scanned=total.images)
    summary = {**metrics(total), "checkpoint": storage.absolute(spec.checkpoint),
               "weights": loaded.weights, "tta_flip": spec.tta_flip, "workers": workers}
    if tracking_uri:
        summary["mlflow_run_id"] = log_evaluation(tracking_uri, experiment, spec, loaded,
                                                  workers, summary, gallery)
        summary["tracking_uri"] = tracking_uri
    summary["wall_s"] = round(time.time() - start, 1)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the evaluate job."""
    parser = argparse.ArgumentParser(
        description="Top-1/top-5 of a trained model on its validation set, logged to MLflow.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint or run directory (local or s3://), or an MLflow model "
                             "URI (runs:/<run id>/model, models:/<name>/<version>)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--latest", action="store_true", help=LATEST_HELP)
    parser.add_argument("--tta-flip", action="store_true",
                        help="average the logits of each image and its mirror image")
    parser.add_argument("--workers", type=int, default=1,
                        help="shards evaluated in parallel as Ray tasks (1: this process, no Ray)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gallery-size", type=int, default=16,
                        help="how many of the most confident mistakes the gallery shows")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--no-mlflow", action="store_true", help="print the result only")
    parser.add_argument("overrides", nargs="*",
                        help="dotted data overrides, e.g. data.root=/data/imagenet "
                             "data.max_val_samples=0")
    return parser


def spec_from_args(args: argparse.Namespace, tracking_uri: str) -> EvalSpec:
    """The EvalSpec for parsed command-line arguments."""
    for name in ("workers", "batch_size", "gallery_size"):
        if getattr(args, name) < 1:
            raise ArtifactError(f"--{name.replace('_', '-')} must be at least 1")
    return EvalSpec(checkpoint=args.checkpoint, ema=args.ema, latest=args.latest,
                    tta_flip=args.tta_flip,
                    overrides=tuple(args.overrides), tracking_uri=tracking_uri,
                    batch_size=args.batch_size, threads=max(1, int(args.cpus_per_worker)),
                    gallery_size=args.gallery_size)


def run_from_args(args: argparse.Namespace, map_shards: ShardMap = local_map) -> dict:
    """The evaluate job for parsed arguments: resolve MLflow, build the spec, evaluate."""
    from rn50.io.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    return run_evaluation(spec_from_args(args, tracking_uri), map_shards, args.workers,
                          "" if args.no_mlflow else tracking_uri, args.experiment)
