"""Learning-rate schedule: linear warmup, then step, cosine or linear decay, evaluated per step.

Expressed as a multiplier of the peak LR for `torch.optim.lr_scheduler.LambdaLR`, so the scheduler
state in a checkpoint is just the step count and a resumed run lands on exactly the same LR.
"""
from __future__ import annotations

import math

import torch

from rn50.config import ScheduleConfig
from rn50.config_sections import Decay, choices


def lr_multiplier(step: int, steps_per_epoch: int, total_epochs: int, cfg: ScheduleConfig) -> float:
    """Fraction of the peak LR to use at optimizer step `step` (0-based)."""
    epoch = step / steps_per_epoch  # fractional epochs, so warmup and decay are smooth per step
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        progress = epoch / cfg.warmup_epochs
        return cfg.warmup_start_fraction + (1 - cfg.warmup_start_fraction) * progress
    if cfg.decay == "step":
        passed = sum(1 for milestone in cfg.step_milestones_epochs if epoch >= milestone)
        return cfg.step_gamma ** passed
    decay_epochs = max(total_epochs - cfg.warmup_epochs, 1e-8)
    progress = min(max((epoch - cfg.warmup_epochs) / decay_epochs, 0.0), 1.0)
    if cfg.decay == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.decay == "linear":
        shape = 1 - progress
    else:
        raise ValueError(f"unknown schedule.decay {cfg.decay!r}; must be one of "
                         f"{list(choices(Decay))}")
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_epochs: int,
                    cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with `lr_multiplier`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, steps_per_epoch, total_epochs, cfg))
