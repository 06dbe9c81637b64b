"""Whether a checkpoint's resume point still means the same samples under this run's settings.

A checkpoint says where to go on in global steps (epoch, steps done). The samples of a step are a
function of (seed, epoch), the global batch and the micro-batches per step (rn50.data.samplers),
so a resume with another global batch would skip or repeat samples and is refused. Another
micro-batch count (`train.micro_batch_size`, or the top of `scaling.num_workers` that sets it)
deals each epoch in another order: the resumed epoch then finishes in the checkpoint's order, each
of its samples once, split into this run's micro-batches; later epochs use the new order. That is
refused only where it would change how many steps an epoch has (parquet row groups of unequal
sizes), which would shift the per-step LR schedule.
"""
from __future__ import annotations

import dataclasses

from torch.utils.data import Dataset

from rn50.config import Config
from rn50.data.loaders import build_loader


def check_same_steps(resumed: dict, config: Config) -> None:
    """Refuse a checkpoint taken with another global batch, where the same step count would be
    other samples."""
    saved = resumed.get("config", {}).get("train", {}).get("global_batch_size")
    if saved is not None and saved != config.train.global_batch_size:
        raise ValueError(f"this run's checkpoints were taken with train.global_batch_size={saved}; "
                         f"resuming with {config.train.global_batch_size} would skip or repeat "
                         f"samples: set train.global_batch_size={saved}, or start a new run "
                         "(another --name)")


def saved_micro_batching(resumed: dict, config: Config) -> Config:
    """`config` with the checkpoint's `train.micro_batch_size` and `scaling.num_workers` (the
    two settings that decide the micro-batches per step); this run's where it holds none."""
    saved = resumed.get("config", {})
    micro = saved.get("train", {}).get("micro_batch_size", config.train.micro_batch_size)
    workers = saved.get("scaling", {}).get("num_workers", config.scaling.num_workers)
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, micro_batch_size=micro),
        scaling=dataclasses.replace(config.scaling, num_workers=workers))


def resumed_order(resumed: dict, config: Config, train_set: Dataset, steps_per_epoch: int) -> int:
    """The micro-batches per step the checkpoint's epoch was dealt for, when this run's differ
    (0 when the same); raises ValueError, naming what changed, where an epoch would have another
    number of steps."""
    then = saved_micro_batching(resumed, config)
    before, now = then.micro_batches_per_step, config.micro_batches_per_step
    if before == now:
        return 0
    steps_then = build_loader(train_set, then.micro_batch_size, rank=0, world_size=1,
                              seed=config.train.seed, epoch=0, train=True,
                              repeated_augmentations=config.data.repeated_augmentations,
                              micro_batches_per_step=before).batch_sampler.steps
    if steps_then != steps_per_epoch:
        changed = " and ".join(f"{key} from {old} to {new}" for key, old, new in (
            ("the top of scaling.num_workers", then.scaling.max_workers,
             config.scaling.max_workers),
            ("train.micro_batch_size", then.train.micro_batch_size, config.train.micro_batch_size))
            if old != new)
        raise ValueError(f"this run's checkpoints were taken with {before} micro-batches of "
                         f"{then.micro_batch_size} images per step; changing {changed} makes it "
                         f"{now} of {config.micro_batch_size}, and an epoch of this data set "
                         f"{steps_per_epoch} steps instead of {steps_then}, which would shift the "
                         "LR schedule: set them back, or start a new run (another --name)")
    return before
