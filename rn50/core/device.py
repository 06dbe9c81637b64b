"""Getting batches onto the training device without making the host wait for it.

On a GPU the host must stay ahead of the device: every `.item()`, `torch.tensor(..., device=)` or
copy from pageable memory makes it wait until the stream has caught up, leaving the GPU idle
while Python prepares the next step. Here: the next batch's host-to-device copy on a side stream
(`prefetch_to_device`), the per-batch normalisation on the device, cuDNN's autotuner on, and
`torch.compile` at fixed shapes. Everything CUDA-only is a no-op on CPU, where the same code runs
in the tests.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
from torch import nn

from rn50.data.transforms import normalize

log = logging.getLogger(__name__)


def configure_backends(device: torch.device) -> None:
    """On CUDA: cuDNN's autotuner (shapes are fixed per resolution, so it tunes each once) and
    TF32 matmuls for fp32 runs (convolutions use TF32 by default already)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def autocast_context(device: torch.device, amp: bool, amp_dtype: str = "bfloat16"):
    """Autocast to `amp_dtype` on CUDA when asked; a no-op elsewhere (CPU trains in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, amp_dtype))
    return contextlib.nullcontext()


def to_device(images_uint8: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a uint8 batch to the device (async from pinned memory; a no-op when
    `prefetch_to_device` put it there already) and normalize it there."""
    non_blocking = device.type == "cuda"
    images = normalize(images_uint8.to(device, non_blocking=non_blocking))
    if channels_last and device.type == "cuda":  # a no-op for the NHWC batches collate stacks
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=non_blocking)


def prefetch_to_device(batches: Iterable, device: torch.device) -> Iterator:
    """`batches` of (uint8 images, labels, skipped) with each batch's host-to-device copy issued
    on a side stream one batch ahead, so it overlaps the step before it. On CPU: `batches`.

    Items that are not tensors (a `DeferredBatch` of `data.decode_on_device`) pass unchanged."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)
    pending = None
    for batch in batches:
        ready, pending = pending, _copy_on(stream, batch, device)
        if ready is not None:
            yield _wait_for(ready)
    if pending is not None:
        yield _wait_for(pending)


def _copy_on(stream, batch: tuple, device: torch.device) -> tuple:
    """Issue `batch`'s tensors' copies on `stream`; (batch on device, event marking the end)."""
    images, labels, *rest = batch
    with torch.cuda.stream(stream):
        if isinstance(images, torch.Tensor):  # a DeferredBatch keeps its labels on the host too
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return (images, labels, *rest), event


def _wait_for(pending: tuple) -> tuple:
    """The compute stream waits (on the device, not the host) for the copy; the tensors are
    marked used by it, so the allocator does not hand their memory to the side stream early."""
    batch, event = pending
    current = torch.cuda.current_stream()
    current.wait_event(event)
    for tensor in batch[:2]:
        if isinstance(tensor, torch.Tensor):
            tensor.record_stream(current)
    return batch


class FixedShapeCompile(nn.Module):
    """`torch.compile(model, dynamic=False)` for training batches of `micro_batch` images; any
    other shape (eval, a short batch after skipped images, the empty DDP join batch) runs the
    eager model, so it neither recompiles nor counts towards dynamo's recompile limit, past which
    dynamo would silently fall back to eager. A new compiled shape (progressive resizing: one per
    resolution) is logged, a recompile being seconds to minutes of an idle GPU."""

    def __init__(self, model: nn.Module, micro_batch: int = 0, backend: str = "inductor"):
        super().__init__()
        self._orig_mod = model  # what `rn50.core.model.unwrap` and checkpoints see through
        # Kept out of the module tree: its parameters are `model`'s, listed once.
        object.__setattr__(self, "_compiled", torch.compile(model, dynamic=False, backend=backend))
        self.micro_batch = micro_batch
        self.compiled_shapes: list[tuple] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The compiled model for the training shape, the eager one for everything else."""
        if not self.training or (self.micro_batch and images.shape[0] != self.micro_batch):
            return self._orig_mod(images)
        key = (tuple(images.shape), images.dtype, torch.is_autocast_enabled(images.device.type))
        if key not in self.compiled_shapes:
            self.compiled_shapes.append(key)
            first = len(self.compiled_shapes) == 1
            log.log(logging.INFO if first else logging.WARNING,
                    "torch.compile: %s for input %s (shape %d of dynamo's recompile limit %d)",
                    "compiling" if first else "recompiling", key, len(self.compiled_shapes),
                    torch._dynamo.config.recompile_limit)
        return self._compiled(images)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # DDP's no_sync and the like, as torch.compile's wrapper does
            return getattr(self._orig_mod, name)


def maybe_compile(model: nn.Module, enabled: bool, micro_batch: int = 0,
                  backend: str = "inductor") -> nn.Module:
    """`FixedShapeCompile(model, micro_batch, backend)` when asked (0: every training batch size
    is compiled); checkpoints and EMA see through it (`model.unwrap`)."""
    # Compiled after DDP wrapping, as PyTorch recommends: DDP's bucketed all-reduce then overlaps
    # with the compiled backward graph.
    if not enabled:
        return model
    # Dynamo's own line for every recompile, with its reason (a new shape is logged below; this
    # also names the others, e.g. BatchNorm not tracking statistics in accumulated micro-batches).
    torch._logging.set_logs(recompiles=True)
    return FixedShapeCompile(model, micro_batch, backend)
