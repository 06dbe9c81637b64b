"""Typed experiment configuration: dataclass sections, YAML recipes and dotted CLI overrides.

A recipe is a YAML file whose top-level keys are the section names below. Every value a user
types (in a recipe, an override `optim.lr=0.2` or a tune space) goes through `Config.from_dict`,
which coerces it to the field's type and names the offending key when it cannot.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rn50.config_sections import (CheckpointConfig, CostConfig, DataConfig,  # noqa: F401
                                  ModelConfig, OptimConfig, ScalingConfig, ScheduleConfig,
                                  TrackingConfig, TrainConfig)

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration value or key the user supplied is wrong; the message says which and why."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Build a validated Config from nested dicts, coercing values and rejecting unknown keys."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
        sections = {}
        for section_name, section_raw in raw.items():
            section_type = _section_types().get(section_name)
            if section_type is None:
                raise ConfigError(f"unknown config section '{section_name}'; "
                                  f"known sections: {', '.join(_section_types())}")
            sections[section_name] = _build_section(section_name, section_type, section_raw or {})
        config = cls(**sections)
        validate(config)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Nested plain-dict form (what a recipe YAML holds)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key form, e.g. {'optim.lr': 0.1}, for MLflow params and tune spaces."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def to_yaml(self) -> str:
        """The resolved config as a recipe YAML that `load_config` accepts unchanged."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def micro_batch_size(self) -> int:
        """Images per forward/backward on one worker (`train.micro_batch_size`, resolved)."""
        return self.train.micro_batch_size or \
            self.train.global_batch_size // self.scaling.max_workers

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one optimizer step, summed over the workers."""
        return self.train.global_batch_size // self.micro_batch_size

    @property
    def peak_lr(self) -> float:
        """The peak LR after linear scaling with the global batch size."""
        return self.optim.lr * self.train.global_batch_size / self.optim.lr_reference_batch_size


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _build_section(section_name: str, section_type: type, raw: Any):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{section_name}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(section_type)
    known = {f.name for f in dataclasses.fields(section_type)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{section_name}.{key}'; "
                              f"known keys in '{section_name}': {', '.join(sorted(known))}")
        values[key] = coerce(f"{section_name}.{key}", value, hints[key])
    return section_type(**values)


def coerce(key: str, value: Any, expected: Any) -> Any:
    """Convert `value` (possibly a string from the command line) to `expected` or raise ConfigError."""
    if isinstance(value, str) and expected is not str:
        value = _parse_scalar(value)
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(expected):
            try:
                return coerce(key, value, arm)
            except ConfigError:
                continue
        arms = " or ".join(arm.__name__ if isinstance(arm, type) else str(arm)
                           for arm in typing.get_args(expected))
        raise ConfigError(f"'{key}' expects {arms}, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(expected)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' expects a mapping like {{a: 1.5}}, got {value!r}")
        return {coerce(f"{key} key", k, key_type): coerce(f"{key}[{k}]", v, value_type)
                for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' expects a list like [30, 60], got {value!r}")
        return [coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"'{key}' expects {getattr(expected, '__name__', expected)}, got {value!r}")


def _parse_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string; users mean a number
            return float(value)
        except ValueError:
            return value
    return value


_CHOICES = {
    "data.dataset": ("digits", "imagefolder", "parquet", "imagenette"),
    "data.imagenette_size_px": (160, 320, 0),
    "data.auto_augment": ("none", "trivialaugment_wide", "randaugment", "autoaugment"),
    "model.arch": ("resnet50", "resnet50d", "resnet50_blurpool"),
    "train.amp_dtype": ("bfloat16", "float16"),
    "train.ray_log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "schedule.decay": ("step", "cosine", "linear"),
    "checkpoint.keep_best_by": ("val_top1", "val_top1_ema", "none"),
}
_POSITIVE = ("data.num_classes", "data.train_crop_px", "data.val_resize_px", "data.val_crop_px",
             "optim.lr", "optim.lr_reference_batch_size", "train.epochs",
             "train.global_batch_size", "train.torch_threads", "train.log_every_steps",
             "scaling.cpus_per_worker", "scaling.resize_check_s", "checkpoint.every_epochs",
             "checkpoint.keep_last")
_NON_NEGATIVE = ("data.loader_workers", "train.micro_batch_size", "data.max_train_samples", "data.max_val_samples",
                 "tracking.system_metrics_interval_s",
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
    for key, allowed in _CHOICES.items():
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
                       ("checkpoint.preemption_poll_s", checkpoint.preemption_poll_s)):
        if value <= 0:
            raise ConfigError(f"'{key}' must be > 0 seconds, got {value!r}")
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
    unpriced = sorted(set(cost.ec2_instance_types) - set(cost.usd_per_hour))
    if unpriced:
        raise ConfigError(f"'cost.ec2_instance_types' names node types without a table price "
                          f"{unpriced}: add them to 'cost.usd_per_hour' (the fallback price)")


def resolve_recipe_path(name_or_path: str) -> Path:
    """Map a recipe name (`demo`) or a YAML path to an existing file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file '{name_or_path}' does not exist")
        return path
    builtin = RECIPES_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(names)} "
                          "(or pass a path to a .yaml file)")
    return builtin


def parse_override(text: str) -> tuple[str, str]:
    """Split `section.field=value` into key and raw value."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.field=value, e.g. optim.lr=0.2")
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of nested `raw` with each dotted override set (validated later)."""
    merged = {section: dict(values or {}) for section, values in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        merged.setdefault(section, {})[name] = value
    return merged


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's nested dict; `base: NAME` first loads that recipe, then this one on top."""
    if path in seen:
        raise ConfigError(f"recipe '{path}' is its own base (via {' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {err}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_recipe(resolve_recipe_path(str(base)), (*seen, path))
    for section, values in raw.items():
        merged[section] = {**(merged.get(section) or {}), **(values or {})}
    return merged


def load_config(recipe: str = "demo", overrides: list[str] | None = None) -> Config:
    """Load a recipe by name or path, apply dotted overrides and validate the result."""
    raw = _read_recipe(resolve_recipe_path(recipe))
    return Config.from_dict(apply_overrides(raw, overrides or []))
