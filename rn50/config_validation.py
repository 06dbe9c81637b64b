"""Value checks of a loaded `rn50.config.Config`: ranges, choices and the rules between fields,
each failure a `ConfigError` that names the key and says what to set."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING

from rn50.config_sections import AUTO, choices

if TYPE_CHECKING:
    from rn50.config import Config


class ConfigError(ValueError):
    """A configuration value or key the user supplied is wrong; the message says which and why."""
    exit_code = 2
    """What `ray_jobs/train_full.py` exits with when a run ends on it."""


_POSITIVE = ("data.num_classes", "data.train_crop_px", "data.val_resize_px", "data.val_crop_px",
             "optim.lr", "optim.lr_reference_batch_size", "train.epochs",
             "train.global_batch_size", "train.log_every_steps",
             "scaling.cpus_per_worker", "scaling.resize_check_s", "checkpoint.every_epochs",
             "checkpoint.keep_last")
_NON_NEGATIVE = ("train.micro_batch_size", "data.max_train_samples",
                 "data.max_val_samples", "tracking.system_metrics_interval_s",
                 "checkpoint.every_steps", "checkpoint.every_minutes",
                 "checkpoint.preemption_check_every_steps",
                 "optim.momentum", "optim.weight_decay", "schedule.warmup_epochs",
                 "schedule.warmup_start_fraction", "schedule.final_lr_fraction",
                 "checkpoint.max_failures", "train.seed", "train.mixup_alpha",
                 "train.cutmix_alpha")
_FRACTIONS = ("optim.label_smoothing", "train.ema_decay", "data.min_crop_scale",
              "data.random_erasing_prob", "model.stochastic_depth_prob")


def validate(config: Config) -> None:
    """Check value ranges and choices, raising ConfigError that names the key."""
    flat = config.flat()
    for key, allowed in choice_fields(config).items():  # also values set in code, not coerced
        if flat[key] not in allowed:
            raise ConfigError(f"'{key}' must be one of {list(allowed)}, got {flat[key]!r}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {flat[key]!r}")
    for key in _FRACTIONS:
        if not 0 <= flat[key] < 1:
            raise ConfigError(f"'{key}' must be in [0, 1), got {flat[key]!r}")
    _validate_batches(config)
    _validate_cpu_counts(config)
    if config.data.val_crop_px > config.data.val_resize_px:
        raise ConfigError("'data.val_crop_px' must not exceed 'data.val_resize_px'")
    data = config.data
    if data.progressive_min_px and not (
            0 < data.progressive_min_px <= data.train_crop_px
            and 0 <= data.progressive_start_epoch <= data.progressive_end_epoch):
        raise ConfigError("progressive resizing needs 0 < 'data.progressive_min_px' <= "
                          "'data.train_crop_px' and 0 <= 'data.progressive_start_epoch' <= "
                          "'data.progressive_end_epoch'")
    _validate_regularizers(config)
    _validate_capacity(config)
    _validate_cost(config)


def choice_fields(config: Config) -> dict[str, tuple]:
    """{dotted key: allowed values} of every `Literal[...]` field of the config's sections."""
    found = {}
    for section in dataclasses.fields(config):
        hints = typing.get_type_hints(type(getattr(config, section.name)))
        found.update({f"{section.name}.{name}": choices(hint) for name, hint in hints.items()
                      if typing.get_origin(hint) is typing.Literal})
    return found


def _validate_regularizers(config: Config) -> None:
    """The checks the generic tables above cannot express for the issue-16 regularizers."""
    for key in ("train.mixup_alpha", "train.cutmix_alpha"):
        value = getattr(config.train, key.split(".")[1])
        if not math.isfinite(value):  # NaN passes `>= 0`; Beta(inf, inf) cannot be sampled
            raise ConfigError(f"'{key}' must be a finite number >= 0 (0 = off), got {value!r}")
    if config.data.repeated_augmentations < 1:
        raise ConfigError("'data.repeated_augmentations' must be >= 1 (1 = off), got "
                          f"{config.data.repeated_augmentations!r}")
    if config.checkpoint.keep_best_by == "val_top1_ema" and config.train.ema_decay <= 0:
        raise ConfigError("'checkpoint.keep_best_by=val_top1_ema' needs EMA weights: set "
                          "'train.ema_decay' (e.g. 0.9999), or keep the best by 'val_top1'")


def _validate_cpu_counts(config: Config) -> None:
    """Threads and loader workers: a count, or `auto` (sized on the worker from its CPUs)."""
    for key, value, least in (("train.torch_threads", config.train.torch_threads, 1),
                              ("data.loader_workers", config.data.loader_workers, 0)):
        if value == AUTO or (isinstance(value, int) and value >= least):
            continue
        raise ConfigError(f"'{key}' must be a number >= {least} or 'auto' (sized from the "
                          f"worker's CPUs), got {value!r}")


def _validate_batches(config: Config) -> None:
    """The worker count, and the global batch as whole micro-batches dealt to that many workers."""
    workers, train = config.scaling.num_workers, config.train
    if isinstance(workers, list) and not (len(workers) == 2 and 1 <= workers[0] <= workers[1]):
        raise ConfigError("'scaling.num_workers' must be a number >= 1 or [min, max] with "
                          f"1 <= min <= max, got {workers!r}")
    if isinstance(workers, int) and workers < 1:
        raise ConfigError(f"'scaling.num_workers' must be >= 1, got {workers!r}")
    most = config.scaling.max_workers
    if not train.micro_batch_size and train.global_batch_size % most:
        raise ConfigError(f"'train.global_batch_size' ({train.global_batch_size}) must be "
                          f"divisible by the most workers, {most} ('scaling.num_workers'), or set "
                          "'train.micro_batch_size' to a divisor of it")
    if train.micro_batch_size and train.global_batch_size % train.micro_batch_size:
        raise ConfigError(f"'train.micro_batch_size' ({train.micro_batch_size}) must divide "
                          f"'train.global_batch_size' ({train.global_batch_size})")
    if config.micro_batches_per_step < most:
        raise ConfigError(f"a step of {train.global_batch_size} images is "
                          f"{config.micro_batches_per_step} micro-batches of "
                          f"{config.micro_batch_size}, too few for {most} workers: lower "
                          "'train.micro_batch_size' or 'scaling.num_workers'")


def _validate_capacity(config: Config) -> None:
    """The start-timeout, spot and preemption fields."""
    scaling, checkpoint = config.scaling, config.checkpoint
    for key, value in (("scaling.start_timeout_s", scaling.start_timeout_s),
                       ("scaling.spot_wait_s", scaling.spot_wait_s),
                       ("scaling.node_start_timeout_s", scaling.node_start_timeout_s),
                       ("scaling.start_check_s", scaling.start_check_s),
                       ("checkpoint.preemption_poll_s", checkpoint.preemption_poll_s)):
        if value <= 0:
            raise ConfigError(f"'{key}' must be > 0 seconds, got {value!r}")
    if scaling.spot_refusals_to_fall_back < 1:
        raise ConfigError("'scaling.spot_refusals_to_fall_back' must be >= 1, got "
                          f"{scaling.spot_refusals_to_fall_back!r}")
    if checkpoint.preemption_grace_s < 0:
        raise ConfigError("'checkpoint.preemption_grace_s' must be >= 0, got "
                          f"{checkpoint.preemption_grace_s!r}")
    if checkpoint.max_preemption_failures < -1:
        raise ConfigError("'checkpoint.max_preemption_failures' must be >= 0, or -1 for "
                          f"unlimited, got {checkpoint.max_preemption_failures!r}")


def _validate_cost(config: Config) -> None:
    """The budget and the price table: finite, non-negative dollars."""
    cost = config.cost
    prices = {"train.budget_usd": config.train.budget_usd,
              "cost.local_usd_per_hour": cost.local_usd_per_hour,
              **{f"cost.usd_per_hour[{k}]": v for k, v in cost.usd_per_hour.items()}}
    for key, value in prices.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"'{key}' must be a finite number of US dollars >= 0, got {value!r}")
    if cost.log_every_s <= 0:
        raise ConfigError(f"'cost.log_every_s' must be > 0 seconds, got {cost.log_every_s!r}")
