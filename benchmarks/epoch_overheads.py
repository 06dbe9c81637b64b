"""Fixed cost per epoch on the training thread, before and after issue 24, side by side.

    python -m benchmarks.epoch_overheads     # -> results/epoch_overheads.json (~3-5 min on dev)

One rank of an 8-GPU ImageNet run, scaled to a CPU: the train set is 1,281,167 samples (ImageNet's
length: the sample streams are drawn over all of it) cycling over generated ImageNet-size JPEGs,
micro-batches of `--batch`, `--workers` loader processes, epochs cut to their last
`--steps` steps (`skip_steps`, as a resume does) so each epoch starts and ends for real. Per
epoch, alternating before/after, medians over `--epochs`:

- loader start: from asking for the epoch's loader to the first batch in hand. Before: a new
  DataLoader per epoch whose workers are forked for it, all 8 ranks' sample streams drawn (the code
  before issue 24, rebuilt here from today's pieces); after: `rn50.data.epoch_loader.EpochLoader`
  (persistent workers, only the rank's own stream). The first batch's decode is in both: it is
  what remains after;
- loader end: from the last batch to the end of the epoch (before: the workers shut down);
- validation: the same two figures for the val loader (4 batches a rank, through a model that
  costs nearly nothing; before: three `.item()`s per batch, whose real cost, a drained GPU queue,
  a CPU cannot show), and the whole pass (`val_pass_s_*`, mostly decoding: the val work itself,
  not counted as fixed cost);
- checkpoint stall: what the training thread waits for a ResNet-50 checkpoint (fp32 weights, SGD
  momentum, EMA, ~300 MB). Before: `torch.save` + SHA-256 on it; after: the host copy
  (`rn50.core.background_save`), with the background write's own time beside it.

Shares of an epoch use 8 GPUs at 6,000 images/s each (an ImageNet epoch in ~26.7 s) and one
checkpoint per epoch (`checkpoint.every_epochs` 1, the default). The CPU figures stand in for a
GPU node's, where workers decode faster (more cores per rank) but fork from a larger process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.images import CycledFiles

from rn50.config import DataConfig, ModelConfig
from rn50.core.background_save import save_in_background
from rn50.io.checkpoints import save_checkpoint
from rn50.core.engine import evaluate
from rn50.core.model import build_model
from rn50.data.epoch_loader import EpochLoader
from rn50.data.loaders import SeededAugmentation, build_loader, loader_options
from rn50.data.samplers import MicroBatchSampler, epoch_streams
from rn50.data.transforms import normalize, train_transform, val_transform

REPO = Path(__file__).resolve().parents[1]

IMAGENET_TRAIN = 1_281_167
WORLD = 8
EPOCH_S = IMAGENET_TRAIN / (WORLD * 6000)  # 8 GPUs at 6,000 images/s each


def old_train_loader(dataset: Dataset, batch: int, seed: int, epoch: int, workers: int,
                     skip: int) -> DataLoader:
    """Rank 0's loader as the code before issue 24 built it every epoch: all 8 ranks' streams
    drawn in full, a fresh DataLoader whose workers end with the epoch."""
    streams = epoch_streams(dataset, WORLD, seed, epoch)
    orders = [list(stream) for stream in streams.values()]  # the old sampler drew all of them
    sampler = MicroBatchSampler({0: streams[0]}, batch, start_step=skip)
    sampler._orders = [orders[0]]
    return DataLoader(SeededAugmentation(dataset, seed, epoch), batch_sampler=sampler,
                      **loader_options(workers, seed, epoch, 0))


@torch.no_grad()
def old_evaluate(model: nn.Module, batches) -> float:
    """The evaluation loop before issue 24: three reads per batch (what they cost on CPU)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, top1, top5 = 0.0, 0.0, 0.0
    for images, labels, _ in batches:
        logits = model(normalize(images)).float()
        loss_sum += criterion(logits, labels).item()
        hits = logits.topk(5, dim=1).indices.eq(labels[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
    return loss_sum


class Stamped:
    """Iterates `batches`, noting when the first batch came, the last one, and the end."""

    def __init__(self, batches):
        self.batches, self.marks, self.end_s = batches, [], 0.0

    def __iter__(self):
        for batch in self.batches:
            self.marks.append(time.perf_counter())
            yield batch
        self.end_s = time.perf_counter()


def time_pass(loader_of, run=lambda batches: [None for _ in batches]) -> dict:
    """One pass of `run` over the loader: seconds to the first batch, from the last batch to
    the end of the loader, and the whole pass."""
    start_s = time.perf_counter()
    stamped = Stamped(loader_of())
    run(stamped)
    done_s = time.perf_counter()
    return {"start_s": stamped.marks[0] - start_s, "end_s": stamped.end_s - stamped.marks[-1],
            "pass_s": done_s - start_s}


def checkpoint_state() -> dict:
    """ResNet-50 (1000 classes) after one SGD step: weights, momentum, an EMA copy."""
    model = build_model(ModelConfig(), 1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": {k: v.clone() for k, v in model.state_dict().items()}, "epoch": 0}


def checkpoint_stalls(state: dict, work: Path, repeats: int) -> dict:
    """Training-thread seconds per save, before (write + hash) and after (host copy)."""
    before, after, written = [], [], []
    for index in range(repeats):
        start_s = time.perf_counter()
        save_checkpoint(work / f"before{index}", state, {})
        before.append(time.perf_counter() - start_s)
        start_s = time.perf_counter()
        future = save_in_background(work / f"after{index}", state, {})
        after.append(time.perf_counter() - start_s)
        future.result()
        written.append(time.perf_counter() - start_s)
        shutil.rmtree(work / f"before{index}")
        shutil.rmtree(work / f"after{index}")
    return {"ckpt_stall_s_before": statistics.median(before),
            "ckpt_stall_s_after": statistics.median(after),
            "ckpt_background_write_s_after": statistics.median(written)}


def loader_and_val_costs(args: argparse.Namespace, paths: list[Path]) -> dict:
    """Median loader and validation seconds per epoch, before and after."""
    cfg = DataConfig(train_crop_px=args.px, val_resize_px=args.px + 32, val_crop_px=args.px)
    train = CycledFiles(paths, IMAGENET_TRAIN, train_transform(cfg))
    val = CycledFiles(paths, WORLD * 4 * args.batch, val_transform(cfg))
    skip = IMAGENET_TRAIN // WORLD // args.batch - args.steps
    options = dict(rank=0, world_size=WORLD, seed=0, loader_workers=args.workers)
    train_loader = EpochLoader(train, args.batch, train=True, **options)
    val_loader = EpochLoader(val, args.batch, train=False, **options)
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))
    runs: dict[str, list] = {k: [] for k in ("before", "after", "val_before", "val_after")}
    for epoch in range(args.epochs):
        runs["before"].append(time_pass(
            lambda: old_train_loader(train, args.batch, 0, epoch, args.workers, skip)))
        runs["after"].append(time_pass(lambda: train_loader.epoch(epoch, skip)))
        runs["val_before"].append(time_pass(
            lambda: build_loader(val, args.batch, epoch=epoch, train=False, **options),
            lambda batches: old_evaluate(tiny, batches)))
        runs["val_after"].append(time_pass(
            lambda: val_loader.epoch(epoch),
            lambda batches: evaluate(tiny, batches, torch.device("cpu"))))
    figures = {}
    for side in ("before", "after"):
        for kind, prefix in (("", "loader"), ("val_", "val_loader")):
            for key in ("start_s", "end_s"):
                figures[f"{prefix}_{key}_{side}"] = statistics.median(
                    r[key] for r in runs[f"{kind}{side}"][1:])
        figures[f"val_pass_s_{side}"] = statistics.median(
            r["pass_s"] for r in runs[f"val_{side}"][1:])
    return figures  # epoch 0 left out: the first epoch starts the workers either way


def main() -> None:
    """Measure both sides and write results/epoch_overheads.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4, help="steps left in each cut epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", help="result path (default results/epoch_overheads.json)")
    args = parser.parse_args()
    from benchmarks.images import generate_jpegs
    from benchmarks.results import write_result
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rn50-epoch-bench-"))
    load_before = os.getloadavg()[0]
    try:
        (work / "jpegs").mkdir()
        paths = generate_jpegs(work / "jpegs", 64)
        state = checkpoint_state()  # held while loaders fork, as in training
        figures = loader_and_val_costs(args, paths)
        figures.update(checkpoint_stalls(state, work, repeats=3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for side in ("before", "after"):
        fixed = sum(figures[f"{name}_{side}"] for name in (
            "loader_start_s", "loader_end_s", "val_loader_start_s", "val_loader_end_s",
            "ckpt_stall_s"))
        figures[f"fixed_s_per_epoch_{side}"] = fixed
        figures[f"share_of_8gpu_epoch_{side}"] = fixed / EPOCH_S
    figures["fixed_cost_ratio_after_vs_before"] = \
        figures["fixed_s_per_epoch_after"] / figures["fixed_s_per_epoch_before"]
    figures["epoch_s_8gpu_6000"] = EPOCH_S
    for key, value in figures.items():
        print(f"{key:38s} {value:.4f}")
    write_result("epoch_overheads", {k: round(v, 4) for k, v in figures.items()}, path=args.out,
                 context={"settings": vars(args), "load_average_1min": [load_before,
                                                                         os.getloadavg()[0]]})


if __name__ == "__main__":
    main()
