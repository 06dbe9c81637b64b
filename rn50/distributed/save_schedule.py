"""When to checkpoint inside an epoch: every N steps, every M minutes, and on a preemption notice.

Nothing here runs on every step: the clock and the preemption notice are looked at every
`checkpoint.preemption_check_every_steps` steps (DEFAULT_CHECK_EVERY_STEPS when that is 0), the
same steps on every rank, so no step pays a device tensor, a broadcast or a `.item()`.
"""
from __future__ import annotations

import logging
import time

import ray.train
import torch
import torch.distributed as dist

from rn50.config import Config

logger = logging.getLogger(__name__)
# How often the clock is read when the preemption check is off: at ~20 steps/s on a GPU about
# every half second, far finer than any `every_minutes` anyone sets.
DEFAULT_CHECK_EVERY_STEPS = 10


class MidEpochSaves:
    """Decides when to checkpoint inside an epoch: every N steps and/or every M minutes.

    Every rank must call `ray.train.report` the same number of times, so a time-based decision
    is taken on rank 0 and broadcast, at steps every rank knows in advance."""

    def __init__(self, config: Config, device: torch.device):
        self.every_steps = config.checkpoint.every_steps
        self.every_s = config.checkpoint.every_minutes * 60
        self.device, self.last_save = device, time.monotonic()
        self.preemption_every = config.checkpoint.preemption_check_every_steps
        self.clock_every = self.preemption_every or DEFAULT_CHECK_EVERY_STEPS
        self.preemption_seen = False

    def due(self, steps_done: int) -> bool:
        """Whether to checkpoint after `steps_done` steps of the current epoch."""
        if self.every_steps and steps_done % self.every_steps == 0:
            return True
        if not self.every_s or steps_done % self.clock_every:
            return False
        return self._rank0_says(time.monotonic() - self.last_save >= self.every_s)

    def _rank0_says(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (a broadcast when torch.distributed is set up)."""
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        # Ray's default group is gloo, which broadcasts host tensors: no device copy, no sync.
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.device
        shared = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.broadcast(shared, src=0)
        return bool(shared.item())

    def preempted(self, steps_done: int) -> bool:
        """True once, when Ray first reports that a node of this run is being preempted."""
        if not self.preemption_every or steps_done % self.preemption_every or self.preemption_seen:
            return False
        info = ray.train.get_preemption_info()  # a barrier: every rank asks at the same steps
        if info is not None:
            left_s = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else float("nan")
            logger.warning("preemption notice: node(s) %s (ranks %s) go in %.0f s; checkpointing "
                           "after step %d", info.preempted_node_ids, info.preempted_ranks, left_s,
                           steps_done)
            self.preemption_seen = True
        return self.preemption_seen

    def saved(self) -> None:
        """Restart the clock after any checkpoint."""
        self.last_save = time.monotonic()
