"""Checkpoint writes off the training thread: a host copy, then `torch.save` + SHA-256 behind it.

Saving on the training thread serialises ~200 MB and hashes it while every other rank waits at
the next collective. Only the copy has to happen there: tensors keep changing as training goes
on, so the state is copied to host memory first (pinned, one device sync, on a GPU; a clone on
CPU), and the copy is written and hashed by one background thread. The checkpoint folder has no
manifest until the write is complete (rn50.io.checkpoints), so nothing can load, upload or
verify a half-written one; whoever hands the folder on waits for `Future.result()`, which also
raises the write's error.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rn50.io.checkpoints import save_checkpoint

log = logging.getLogger(__name__)
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rn50-ckpt-writer")
_pending: list[Future] = []


def host_copy(state: Any) -> Any:
    """`state` with every tensor copied to host memory: nested dicts, lists and tuples rebuilt,
    everything else shared (numbers and strings cannot change under the writer)."""
    on_cuda: list[bool] = []
    copied = _copy(state, on_cuda)
    if on_cuda:
        torch.cuda.synchronize()  # the one wait: every non-blocking copy has landed
    return copied


def _copy(value: Any, on_cuda: list[bool]) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.device.type != "cuda":
            return value.clone()
        on_cuda.append(True)
        pinned = torch.empty_like(value, device="cpu", pin_memory=True)
        return pinned.copy_(value, non_blocking=True)
    if isinstance(value, dict):
        return {key: _copy(item, on_cuda) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_copy(item, on_cuda) for item in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    return value


def save_in_background(directory: str | Path, state: dict[str, Any],
                       summary: dict[str, Any]) -> Future:
    """Copy `state` to the host now, write it as a checkpoint into `directory` on the writer
    thread; the Future gives the folder once its manifest is written.

    At most one earlier write may still be pending: a further save waits for it first (and says
    so), so host copies cannot pile up when saves come faster than the disk takes them."""
    _wait_for_older_writes()
    copied = host_copy(state)
    future = _WRITER.submit(save_checkpoint, directory, copied, summary)
    _pending.append(future)
    return future


def _wait_for_older_writes() -> None:
    """Let at most one write be pending when a new one starts."""
    _pending[:] = [future for future in _pending if not future.done()]
    while len(_pending) > 1:
        start_s = time.perf_counter()
        log.warning("checkpoint: waiting for an earlier checkpoint's write to finish before "
                    "copying the next (saves come faster than the disk takes them)")
        try:
            _pending.pop(0).result()
        except Exception:  # noqa: BLE001 - raised to whoever hands that folder on
            pass
        log.warning("checkpoint: waited %.1f s for the earlier write",
                    time.perf_counter() - start_s)
