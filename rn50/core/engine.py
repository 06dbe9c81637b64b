"""The plain-PyTorch parts of training: optimizer, one epoch of SGD, evaluation.

No Ray here. `torch.distributed` is used only if a process group is already initialised (Ray
Train's TorchTrainer sets one up), so these functions also run in a single process under pytest.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from rn50.config import Config
from rn50.core.device import autocast_context, configure_backends, prefetch_to_device, to_device
from rn50.core.model import parameter_groups
from rn50.core.step import StepContext, train_step, world_size
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
    by step, and `rn50.core.step.train_step` accumulates their gradients. `start_step` is how many
    steps of this epoch were done before (a mid-epoch resume); `after_step(steps_done_in_epoch)`
    runs after every optimizer step (checkpoints); `log` gets a progress line and
    `on_step_metrics(global_step, metrics)` its figures every `train.log_every_steps` steps.
    """
    ctx = StepContext.for_epoch(state, device, config, micro_slots)
    # The loss is summed on the device: a `.item()` per step would make the host wait for the
    # GPU every step; it syncs only when a log line is due.
    loss_sum, images_seen, skipped = torch.zeros((), device=device), 0, 0
    window = StepWindow(world_size())
    start = time.perf_counter()
    # On a GPU the next batch's copy to the device overlaps this step (a no-op on CPU).
    on_device = prefetch_to_device(batches, device)
    for step, micro_batches in enumerate(_step_batches(on_device, len(ctx.slots), window),
                                         start=start_step):
        result = train_step(ctx, micro_batches)
        skipped += result.skipped
        if not result.stepped:
            continue
        loss_sum += result.loss_sum
        images_seen += result.images
        window.images += result.images
        if result.images and step % config.train.log_every_steps == 0:  # no loss: no line
            metrics = window.close(result.last_loss.item(), state.optimizer.param_groups[0]["lr"])
            log(_progress_line(step, metrics))
            if on_step_metrics is not None:
                on_step_metrics(state.scheduler.last_epoch, metrics)
        if after_step is not None:
            after_step(step + 1)
    seconds = time.perf_counter() - start
    loss_sum, images_seen, skipped, seconds = _all_reduce_sum(
        [loss_sum, images_seen, skipped, seconds], device)
    return EpochStats(loss=loss_sum / max(images_seen, 1), images=int(images_seen),
                      seconds=seconds / world_size(), skipped_images=int(skipped))


@dataclass
class EvalTotals:
    """Sums of one evaluation on this process, kept on the device: a read per batch would drain
    the GPU's queue every batch, so they are read once, at the end."""
    loss_sum: torch.Tensor
    top1: torch.Tensor
    """Images whose top-1 prediction is right."""
    top5: torch.Tensor
    """Images whose label is among the top 5 (top `classes` with fewer than 5 classes)."""
    images: int = 0
    skipped: int = 0
    """Images the loader could not decode."""

    @classmethod
    def zeros(cls, device: torch.device) -> EvalTotals:
        """Empty sums on `device` (float64: exact counts and a loss sum that does not drift)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        return cls(loss_sum, torch.zeros_like(loss_sum), torch.zeros_like(loss_sum))

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch's summed loss and top-1 / top-5 hits."""
        self.loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        self.images += labels.numel()


def predict_logits(model: nn.Module, images: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """Float32 logits of a normalized batch; with `tta_flip`, averaged with the mirrored batch's."""
    logits = model(images).float()
    if tta_flip:
        logits = (logits + model(images.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def evaluation_loop(model: nn.Module, batches: Iterable, device: torch.device, *,
                    channels_last: bool = False, amp: bool = False, amp_dtype: str = "bfloat16",
                    tta_flip: bool = False,
                    on_batch: Callable[..., None] | None = None) -> EvalTotals:
    """The one evaluation loop (training's validation and `rn50.serve.evaluate`): the sums over
    `batches` of (uint8 images, labels, *extras, skipped) on this process. `on_batch(logits,
    labels, *extras)` sees each non-empty batch (the evaluate job's gallery keeps mistakes)."""
    model.eval()
    configure_backends(device)
    totals = EvalTotals.zeros(device)
    for images_uint8, labels, *extras, skipped in prefetch_to_device(batches, device):
        totals.skipped += skipped
        if labels.numel() == 0:
            continue
        images, labels = to_device(images_uint8, labels, device, channels_last)
        with autocast_context(device, amp, amp_dtype):
            logits = predict_logits(model, images, tta_flip)
        totals.add(logits, labels)
        if on_batch is not None:
            on_batch(logits, labels, *extras)
    return totals


def evaluate(model: nn.Module, batches: Iterable, device: torch.device, *,
             channels_last: bool = False, amp: bool = False,
             amp_dtype: str = "bfloat16") -> dict[str, float]:
    """Top-1, top-5 (percent) and mean loss over `batches`, summed across all workers."""
    totals = evaluation_loop(model, batches, device, channels_last=channels_last, amp=amp,
                             amp_dtype=amp_dtype)
    loss_sum, top1, top5, count = _all_reduce_sum(
        [totals.loss_sum, totals.top1, totals.top5, totals.images], device)
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}
