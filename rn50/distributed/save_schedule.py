"""When to checkpoint inside an epoch: every N steps, every M minutes, and on a preemption notice."""
from __future__ import annotations

import logging
import time

import ray.train
import torch
import torch.distributed as dist

from rn50.config import Config

logger = logging.getLogger(__name__)


class MidEpochSaves:
    """Decides when to checkpoint inside an epoch: every N steps and/or every M minutes.

    Every rank must call `ray.train.report` the same number of times, so a time-based decision
    is taken on rank 0 and broadcast."""

    def __init__(self, config: Config, device: torch.device):
        self.every_steps = config.checkpoint.every_steps
        self.every_s = config.checkpoint.every_minutes * 60
        self.device, self.last_save = device, time.monotonic()
        self.preemption_every = config.checkpoint.preemption_check_every_steps
        self.preemption_seen = False

    def due(self, steps_done: int) -> bool:
        """Whether to checkpoint after `steps_done` steps of the current epoch."""
        due = bool(self.every_steps) and steps_done % self.every_steps == 0
        if self.every_s:
            flag = torch.tensor([time.monotonic() - self.last_save >= self.every_s],
                                dtype=torch.int32, device=self.device)
            if dist.is_initialized():
                dist.broadcast(flag, src=0)
            due = due or bool(flag.item())
        return due

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
