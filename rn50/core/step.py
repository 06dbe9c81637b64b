"""One optimizer step of SGD, read in one place: forward and backward of every micro-batch the
rank trains, gradients accumulated, then the optimizer, the per-step schedule and the EMA.

`StepContext` holds what every step of an epoch shares (built once per epoch); `train_step`
returns a `StepResult`, whose sums stay on the device until a progress line reads them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rn50.config import Config
from rn50.core.device import autocast_context, configure_backends, to_device
from rn50.core.mixing import DEPTH_STREAM, BatchMixer, build_mixer, seeded_rng
from rn50.core.training_state import TrainingState
from rn50.data.device_decode import DeferredBatch


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class StepContext:
    """What every step of an epoch shares: the state it updates and how its loss is computed."""
    state: TrainingState
    scaler: torch.amp.GradScaler
    """The fp16 loss scaler; a disabled one passes straight through (scale() is the loss)."""
    criterion: nn.Module
    mixer: BatchMixer | None
    """MixUp / CutMix of the run (None when both are off)."""
    device: torch.device
    config: Config
    slots: list[int]
    """The micro-batches of each step this rank trains (rn50.data.samplers.micro_batch_slots)."""
    loss_scale: float
    """Each micro-batch's loss multiplier (world size / micro-batches per step), so that DDP's
    average over ranks is the mean over the whole global batch at any world size."""

    @classmethod
    def for_epoch(cls, state: TrainingState, device: torch.device, config: Config,
                  micro_slots: list[int] | None) -> StepContext:
        """The context of one epoch; puts the model in training mode."""
        state.model.train()
        configure_backends(device)
        # With soft (mixed) targets torch smooths the probabilities: see rn50.core.mixing.
        criterion = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
        # Without micro_slots every batch is a whole per-rank step (world size x batch = global).
        loss_scale = world_size() / config.micro_batches_per_step \
            if micro_slots is not None else 1.0
        return cls(state=state,
                   scaler=state.scaler or torch.amp.GradScaler(device.type, enabled=False),
                   criterion=criterion, mixer=build_mixer(config), device=device, config=config,
                   slots=micro_slots if micro_slots is not None else [rank()],
                   loss_scale=loss_scale)


@dataclass
class StepResult:
    """What one step trained. The loss sums stay on the device: reading them syncs the host."""
    loss_sum: torch.Tensor
    """Sum over the trained images of their loss (a device scalar)."""
    images: int
    """Images trained (undecodable ones left out)."""
    skipped: int
    """Images the loader or the device decoder could not decode."""
    last_loss: torch.Tensor | None
    """The last micro-batch's mean loss (the progress line's); None when nothing trained."""
    stepped: bool
    """Whether the optimizer stepped (not when every image of a single worker's step failed)."""


def train_step(ctx: StepContext, micro_batches: list) -> StepResult:
    """One optimizer step over this rank's `micro_batches` of (uint8 images, labels, skipped)."""
    ctx.state.optimizer.zero_grad(set_to_none=True)
    result = _accumulate(ctx, micro_batches)
    # Every image of the step undecodable: no step on one worker. Under DDP this rank's
    # gradients are the other ranks' average now, so it steps with them (with all ranks
    # empty that is momentum and weight decay alone, on every rank alike).
    if not result.images and not is_ddp(ctx.state.model):
        return result
    _optimizer_step(ctx.state, ctx.scaler)
    result.stepped = True
    return result


def _accumulate(ctx: StepContext, micro_batches: list) -> StepResult:
    """Forward and backward every micro-batch of one step, the gradients adding up in `.grad`."""
    result = StepResult(torch.zeros((), device=ctx.device), 0, 0, None, stepped=False)
    model, last_index = ctx.state.model, len(ctx.slots) - 1
    for index, (images_uint8, labels, num_skipped) in enumerate(micro_batches):
        result.skipped += num_skipped
        if isinstance(images_uint8, DeferredBatch):  # data.decode_on_device: decode here
            images_uint8, labels, undecodable = images_uint8.decode(labels, ctx.device)
            result.skipped += undecodable
        if labels.numel() == 0:  # every image undecodable
            if is_ddp(model):
                _join_empty(model, ctx.scaler, first=index == 0, last=index == last_index,
                            device=ctx.device)
            continue
        images, labels = to_device(images_uint8, labels, ctx.device,
                                   ctx.config.model.channels_last)
        with _accumulating(model, first=index == 0, last=index == last_index):
            loss = _forward_loss(ctx, images, labels, ctx.slots[index])
            scaled = loss * ctx.loss_scale if ctx.loss_scale != 1 else loss
            ctx.scaler.scale(scaled).backward()
        result.loss_sum += loss.detach().float() * labels.numel()
        result.images += labels.numel()
        result.last_loss = loss
    return result


def _forward_loss(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor,
                  micro_batch: int) -> torch.Tensor:
    """The micro-batch's loss, with MixUp/CutMix targets and stochastic-depth masks drawn from
    generators seeded by (train.seed, global step, micro-batch index) (rn50.core.mixing).

    The global step is `scheduler.last_epoch` (LambdaLR counts optimizer steps, and a checkpoint
    restores the count), so a resume needs nothing more."""
    config, device = ctx.config, ctx.device
    global_step, targets = ctx.state.scheduler.last_epoch, labels
    if ctx.mixer is not None:
        images, targets = ctx.mixer(images, labels, global_step, micro_batch)
        if config.model.channels_last and device.type == "cuda":  # roll/clone may give NCHW
            images = images.contiguous(memory_format=torch.channels_last)
    depth_rng = seeded_rng(device, config.train.seed, global_step, micro_batch, DEPTH_STREAM) \
        if config.model.stochastic_depth_prob > 0 else contextlib.nullcontext()
    with depth_rng, autocast_context(device, config.train.amp, config.train.amp_dtype):
        return ctx.criterion(ctx.state.model(images), targets)


@contextlib.contextmanager
def _accumulating(model: nn.Module, first: bool, last: bool):
    """One micro-batch of a step: DDP's gradient all-reduce only after the rank's last one, and
    BatchNorm's running statistics updated only by its first.

    Why the BatchNorm rule: DDP copies rank 0's buffers to every rank, so without accumulation the
    running statistics follow micro-batch 0 of each step alone. Updating them from micro-batch 0
    only at any world size keeps them independent of it (and the checkpoint with them)."""
    no_sync = getattr(model, "no_sync", None)
    frozen = [] if first else [m for m in model.modules()
                               if isinstance(m, nn.modules.batchnorm._BatchNorm)
                               and m.track_running_stats]
    for module in frozen:  # train-mode BN then normalises by the batch and updates nothing
        module.track_running_stats = False
    try:
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            yield
    finally:
        for module in frozen:
            module.track_running_stats = True


def _optimizer_step(state: TrainingState, scaler: torch.amp.GradScaler) -> None:
    """The optimizer on the accumulated gradients, the per-step schedule, then the EMA."""
    scaler.step(state.optimizer)
    scaler.update()
    state.scheduler.step()  # the schedule is per step, so warmup is smooth and resumes exactly
    if state.ema is not None:
        state.ema.update(state.model)


def is_ddp(model: nn.Module) -> bool:
    """Whether `model` is DDP-wrapped: its forward and backward then run collectives."""
    return getattr(model, "no_sync", None) is not None


def _join_empty(model: nn.Module, scaler: torch.amp.GradScaler, first: bool, last: bool,
                device: torch.device) -> None:
    """Take part in DDP's collectives with an empty micro-batch: a forward (DDP broadcasts the
    buffers in it) and a zero loss's backward (the gradient all-reduce, after the last one).
    Skipping them would leave the other ranks waiting for this one forever."""
    empty = torch.zeros((0, 3, 32, 32), device=device)  # BatchNorm leaves its statistics alone
    with _accumulating(model, first=first, last=last):
        scaler.scale(model(empty).sum() * 0).backward()
