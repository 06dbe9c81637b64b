"""The plain-PyTorch parts of training: optimizer, one epoch of SGD, evaluation.

No Ray here. `torch.distributed` is used only if a process group is already initialised (Ray
Train's TorchTrainer sets one up), so these functions also run in a single process under pytest.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from rn50.config import Config
from rn50.data.device_decode import DeferredBatch
from rn50.core.device import autocast_context, configure_backends, prefetch_to_device, to_device
from rn50.core.mixing import DEPTH_STREAM, BatchMixer, build_mixer, seeded_rng
from rn50.core.model import parameter_groups
from rn50.core.training_state import TrainingState


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD with momentum at the batch-scaled peak LR (the schedule multiplies it per step)."""
    groups = parameter_groups(model, config.optim.weight_decay, config.optim.no_bn_bias_decay)
    # foreach=True batches the update over all tensors: same maths, fewer kernel launches.
    return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.optim.momentum,
                           nesterov=config.optim.nesterov and config.optim.momentum > 0,
                           foreach=True)


def build_grad_scaler(device: torch.device, config: Config) -> torch.amp.GradScaler:
    """The dynamic loss scaler fp16 autocast needs on a GPU; a pass-through everywhere else."""
    # bf16 has fp32's exponent range, so its gradients do not underflow and need no scaling.
    enabled = config.train.amp and config.train.amp_dtype == "float16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _all_reduce_sum(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """`values` (device scalars or numbers) summed over all workers, read back in one go: the
    only host sync of an epoch outside the logging steps."""
    tensor = torch.stack([value.detach().to(device, torch.float64).reshape(())
                          if isinstance(value, torch.Tensor)
                          else torch.tensor(float(value), dtype=torch.float64, device=device)
                          for value in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _forward_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  criterion: nn.Module, mixer: BatchMixer | None, global_step: int,
                  micro_batch: int, device: torch.device, config: Config) -> torch.Tensor:
    """The micro-batch's loss, with MixUp/CutMix targets and stochastic-depth masks drawn from
    generators seeded by (train.seed, global_step, micro-batch index) (rn50.core.mixing)."""
    targets = labels
    if mixer is not None:
        images, targets = mixer(images, labels, global_step, micro_batch)
        if config.model.channels_last and device.type == "cuda":  # roll/clone may give NCHW
            images = images.contiguous(memory_format=torch.channels_last)
    depth_rng = seeded_rng(device, config.train.seed, global_step, micro_batch, DEPTH_STREAM) \
        if config.model.stochastic_depth_prob > 0 else contextlib.nullcontext()
    with depth_rng, autocast_context(device, config.train.amp, config.train.amp_dtype):
        return criterion(model(images), targets)


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


@dataclass
class EpochStats:
    """What one training epoch measured, summed over all workers.

    `loss` is against the targets the model trained on: with MixUp/CutMix the mixed probabilities
    (so not comparable with an unmixed run's). No train top-1 is reported, mixing or not.
    """
    loss: float
    images: int
    seconds: float
    skipped_images: int

    @property
    def images_per_s(self) -> float:
        """Throughput of the whole worker group."""
        return self.images / max(self.seconds, 1e-9)


def _optimizer_step(state: TrainingState, scaler: torch.amp.GradScaler) -> None:
    """The optimizer on the accumulated gradients, the per-step schedule, then the EMA."""
    scaler.step(state.optimizer)
    scaler.update()
    state.scheduler.step()  # the schedule is per step, so warmup is smooth and resumes exactly
    if state.ema is not None:
        state.ema.update(state.model)


def _step_batches(batches: Iterable, per_step: int, window: "StepWindow") -> Iterator[list]:
    """`batches` grouped into the rank's micro-batches of each step; the wait for each group
    is added to `window.data_wait_s`. A ragged last group (never dealt) is dropped."""
    iterator, fetch_start = iter(batches), time.perf_counter()
    while True:
        group = list(itertools.islice(iterator, per_step))
        window.data_wait_s += time.perf_counter() - fetch_start
        if len(group) < per_step:
            return
        yield group
        fetch_start = time.perf_counter()


def _accumulate(state: TrainingState, scaler: torch.amp.GradScaler, micro_batches: list,
                slots: list[int], loss_scale: float, criterion: nn.Module,
                mixer: BatchMixer | None, device: torch.device, config: Config):
    """Forward and backward every micro-batch of one step, the gradients adding up in `.grad`:
    (sum of loss x images, images trained, images skipped, the last micro-batch's loss)."""
    loss_sum, trained, skipped, loss = torch.zeros((), device=device), 0, 0, None
    for index, (images_uint8, labels, num_skipped) in enumerate(micro_batches):
        skipped += num_skipped
        if isinstance(images_uint8, DeferredBatch):  # data.decode_on_device: decode here
            images_uint8, labels, undecodable = images_uint8.decode(labels, device)
            skipped += undecodable
        if labels.numel() == 0:  # every image undecodable
            if _is_ddp(state.model):
                _join_empty(state.model, scaler, first=index == 0, last=index == len(slots) - 1,
                            device=device)
            continue
        images, labels = to_device(images_uint8, labels, device, config.model.channels_last)
        with _accumulating(state.model, first=index == 0, last=index == len(slots) - 1):
            loss = _forward_loss(state.model, images, labels, criterion, mixer,
                                 state.scheduler.last_epoch, slots[index], device, config)
            scaler.scale(loss * loss_scale if loss_scale != 1 else loss).backward()
        loss_sum += loss.detach().float() * labels.numel()
        trained += labels.numel()
    return loss_sum, trained, skipped, loss


def _is_ddp(model: nn.Module) -> bool:
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


class StepWindow:
    """What happened since the last progress line: images trained, seconds waited for data."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.start, self.images, self.data_wait_s = time.perf_counter(), 0, 0.0

    def close(self, loss: float, lr: float) -> dict[str, float]:
        """The window's per-step metrics (images/s over all workers, as this rank saw its share);
        a new window starts."""
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        metrics = {"train/loss": loss, "lr": lr,
                   "images_per_s": self.images * self.world_size / seconds,
                   "data_wait_fraction": min(self.data_wait_s / seconds, 1.0)}
        self.start, self.images, self.data_wait_s = now, 0, 0.0
        return metrics


def _progress_line(step: int, metrics: dict[str, float]) -> str:
    return (f"step {step} loss {metrics['train/loss']:.4f} lr {metrics['lr']:.5f} "
            f"| {metrics['images_per_s']:.0f} img/s, {metrics['data_wait_fraction']:.0%} waiting "
            "for data")


def train_one_epoch(state: TrainingState, batches: Iterable, device: torch.device, config: Config,
                    *, log: Callable[[str], None] = lambda message: None, start_step: int = 0,
                    after_step: Callable[[int], None] | None = None,
                    on_step_metrics: Callable[[int, dict], None] | None = None,
                    micro_slots: list[int] | None = None) -> EpochStats:
    """One pass of SGD over `batches` of (uint8 images, labels, skipped count), updating the
    model, optimizer, per-step schedule, EMA and loss scaler held in `state`.

    `micro_slots` are the micro-batches of each step this rank trains (rn50.data.samplers:
    `micro_batch_slots`; default: each batch is one rank's whole step); `batches` yields them step
    by step. Their
    gradients are accumulated, each loss scaled by world size / micro-batches per step, so that
    DDP's average over ranks is the mean over the whole global batch at any world size.
    `start_step` is how many steps of this epoch were done before (a mid-epoch resume);
    `after_step(steps_done_in_epoch)` runs after every optimizer step (checkpoints). The global
    step that seeds mixing and stochastic depth is `scheduler.last_epoch` (LambdaLR counts
    optimizer steps, and a checkpoint restores the count), so a resume needs nothing more.
    """
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    model.train()
    configure_backends(device)
    # A disabled scaler passes straight through: scale() is the loss, step() is optimizer.step().
    scaler = state.scaler or torch.amp.GradScaler(device.type, enabled=False)
    # With soft (mixed) targets torch smooths the probabilities: see rn50.core.mixing.
    criterion = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    mixer = build_mixer(config)
    world = _world_size()
    slots = micro_slots if micro_slots is not None else [_rank()]
    # Without micro_slots every batch is a whole per-rank step (world size x batch = global).
    loss_scale = world / config.micro_batches_per_step if micro_slots is not None else 1.0
    # The loss is summed on the device: a `.item()` per step would make the host wait for the
    # GPU every step; it syncs only when a log line is due.
    loss_sum, images_seen, skipped = torch.zeros((), device=device), 0, 0
    window = StepWindow(world)
    start = time.perf_counter()
    # On a GPU the next batch's copy to the device overlaps this step (a no-op on CPU).
    on_device = prefetch_to_device(batches, device)
    for step, micro_batches in enumerate(_step_batches(on_device, len(slots), window),
                                         start=start_step):
        optimizer.zero_grad(set_to_none=True)
        step_loss_sum, trained, step_skipped, loss = _accumulate(
            state, scaler, micro_batches, slots, loss_scale, criterion, mixer, device, config)
        skipped += step_skipped
        # Every image of the step undecodable: no step on one worker. Under DDP this rank's
        # gradients are the other ranks' average now, so it steps with them (with all ranks
        # empty that is momentum and weight decay alone, on every rank alike).
        if not trained and not _is_ddp(model):
            continue
        loss_sum += step_loss_sum
        images_seen += trained
        window.images += trained
        _optimizer_step(state, scaler)
        if trained and step % config.train.log_every_steps == 0:  # no loss of its own: no line
            metrics = window.close(loss.item(), optimizer.param_groups[0]["lr"])
            log(_progress_line(step, metrics))
            if on_step_metrics is not None:
                on_step_metrics(scheduler.last_epoch, metrics)
        if after_step is not None:
            after_step(step + 1)
    seconds = time.perf_counter() - start
    loss_sum, images_seen, skipped, seconds = _all_reduce_sum(
        [loss_sum, images_seen, skipped, seconds], device)
    return EpochStats(loss=loss_sum / max(images_seen, 1), images=int(images_seen),
                      seconds=seconds / world, skipped_images=int(skipped))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, *,
             channels_last: bool = False, amp: bool = False,
             amp_dtype: str = "bfloat16") -> dict[str, float]:
    """Top-1, top-5 (percent) and mean loss over `batches`, summed across all workers."""
    model.eval()
    configure_backends(device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # Summed on the device and read once at the end: a read per batch would drain the GPU's
    # queue every batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1, top5, count = torch.zeros_like(loss_sum), torch.zeros_like(loss_sum), 0
    for images_uint8, labels, _ in prefetch_to_device(batches, device):
        if labels.numel() == 0:
            continue
        images, labels = to_device(images_uint8, labels, device, channels_last)
        with autocast_context(device, amp, amp_dtype):
            logits = model(images).float()
        loss_sum += criterion(logits, labels)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        count += labels.numel()
    loss_sum, top1, top5, count = _all_reduce_sum([loss_sum, top1, top5, count], device)
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}
