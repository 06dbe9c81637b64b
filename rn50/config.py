"""Typed experiment configuration: dataclass sections, YAML recipes and dotted CLI overrides.

A recipe is a YAML file whose top-level keys are the section names below. Every value a user
types (in a recipe, an override `optim.lr=0.2` or a tune space) goes through `Config.from_dict`,
which coerces it to the field's type and names the offending key when it cannot.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rn50.config_sections import (CheckpointConfig, CostConfig, DataConfig,
                                  ModelConfig, OptimConfig, ScalingConfig, ScheduleConfig,
                                  TrackingConfig, TrainConfig)
from rn50.config_validation import ConfigError, validate

RECIPES_DIR = Path(__file__).parent / "recipes"


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
        """A validated Config from nested dicts, coercing values and rejecting unknown keys."""
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
    """`value` (maybe a string from the command line) as type `expected`, else ConfigError."""
    origin = typing.get_origin(expected)
    if origin is typing.Literal:
        return _choice(key, value, typing.get_args(expected))
    if isinstance(value, str) and expected is not str:
        value = _parse_scalar(value)
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


def _choice(key: str, value: Any, allowed: tuple) -> Any:
    """`value` as one of the `allowed` values of a `Literal[...]` field, else ConfigError."""
    try:
        typed = coerce(key, value, type(allowed[0]))  # "320" from the command line is 320
    except ConfigError:
        typed = value
    # Compared with their types: `False == 0` must not pass as the choice 0.
    if not any(type(typed) is type(option) and typed == option for option in allowed):
        raise ConfigError(f"'{key}' must be one of {list(allowed)}, got {typed!r}")
    return typed


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
        raise ConfigError(f"override '{text}' must look like section.field=value, "
                          "e.g. optim.lr=0.2")
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
