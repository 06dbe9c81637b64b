"""Sweep definitions (`tune_spaces/*.yaml`) as data, validated against the config's fields.

A sweep file names a base recipe, fixed overrides, the metric, the scheduler, the searcher and a
space over dotted config keys. Everything is checked here, without Ray, so a typo in a space fails
in a second with a message naming the key, not after a cluster has started.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rn50.config import (Config, ConfigError, apply_overrides, coerce, load_config,
                         resolve_recipe_path)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
METRICS = {"val_top1": "max", "val_top5": "max", "val_loss": "min", "train_loss": "min"}
SEARCHERS = ("random", "optuna")


@dataclass
class Distribution:
    """One searched key: `kind` is loguniform, uniform, choice or grid; `values` its arguments."""
    kind: str
    values: list


@dataclass
class AshaSpec:
    """ASHA early stopping, in epochs."""
    grace_period_epochs: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """A validated sweep: what to train, what to vary, how to search and when to stop trials."""
    base_recipe: str
    overrides: list[str] = field(default_factory=list)
    metric: str = "val_top1"
    mode: str = "max"
    num_samples: int = 8
    search: str = "random"
    seed: int = 0
    asha: AshaSpec | None = None
    max_concurrent_trials: int = 0
    space: dict[str, Distribution] = field(default_factory=dict)

    def base_config(self, extra_overrides: list[str] | None = None) -> Config:
        """The base recipe with the sweep's fixed overrides (and any from the command line)."""
        return load_config(self.base_recipe, [*self.overrides, *(extra_overrides or [])])

    def trial_config(self, params: dict[str, Any],
                     extra_overrides: list[str] | None = None) -> Config:
        """The base config with one trial's dotted parameters set."""
        raw = self.base_config(extra_overrides).to_dict()
        overrides = [f"{key}={_yaml_scalar(value)}" for key, value in params.items()]
        return Config.from_dict(apply_overrides(raw, overrides))


def trial_run_name(params: dict[str, Any]) -> str:
    """A trial's name as its searched values (`lr=0.1 weight_decay=5e-05`): what tells two
    curves in MLflow's compare view apart, where Tune's `train_trial_7ad23_00000` says nothing.
    Each key by its last part, unless two keys share it; floats to 3 significant digits."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    parts = []
    for key, short in zip(params, last):
        value = params[key]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{short if last.count(short) == 1 else key}={shown}")
    return " ".join(parts)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _field_type(key: str) -> Any:
    section, _, name = key.partition(".")
    section_types = typing.get_type_hints(Config)
    if section not in section_types or name not in typing.get_type_hints(section_types[section]):
        known = ", ".join(sorted(Config().flat()))
        raise ConfigError(f"space key '{key}' is not a config field; known keys: {known}")
    return typing.get_type_hints(section_types[section])[name]


def parse_distribution(key: str, raw: Any) -> Distribution:
    """Validate `{loguniform: [lo, hi]}` etc. for config key `key`."""
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"space '{key}' must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                          f"got {raw!r}")
    kind, values = next(iter(raw.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"space '{key}': unknown distribution '{kind}'; use one of "
                          f"{DISTRIBUTIONS}")
    expected = _field_type(key)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space '{key}': {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return Distribution(kind, [coerce(key, value, expected) for value in values])
    if expected not in (float, int) or len(values) != 2:
        raise ConfigError(f"space '{key}': {kind} needs [low, high] on a numeric field")
    low, high = (coerce(key, value, float) for value in values)
    if not low < high:
        raise ConfigError(f"space '{key}': empty range, low ({low}) must be < high ({high})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space '{key}': loguniform bounds must be > 0, got low={low}")
    for bound in (low, high):  # both ends must be legal values of the field
        validate_value(key, expected(bound) if expected is int else bound)
    return Distribution(kind, [low, high])


def validate_value(key: str, value: Any) -> None:
    """Raise ConfigError if `key=value` would not make a valid config on the default recipe."""
    raw = Config().to_dict()
    section, _, name = key.partition(".")
    raw[section][name] = value
    try:
        Config.from_dict(raw)
    except ConfigError as err:
        if key in str(err):
            raise ConfigError(f"space '{key}': {err}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist (see tune_spaces/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file '{path}' is not valid YAML: {err}") from None
    known = {"base_recipe", "overrides", "metric", "mode", "num_samples", "search", "seed",
             "scheduler", "max_concurrent_trials", "space"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)} in '{path}'; known: "
                          f"{sorted(known)}")
    spec = _build_spec(raw)
    base = spec.base_config()  # the base recipe and fixed overrides must load on their own
    if base.checkpoint.every_steps or base.checkpoint.every_minutes:
        # Tune counts every report as an iteration and expects the metric in each one; mid-epoch
        # checkpoints report neither, so ASHA would compare trials at the wrong points.
        raise ConfigError("sweeps need checkpoint.every_steps=0 and checkpoint.every_minutes=0 "
                          "(trials checkpoint once per epoch)")
    return spec


def _build_spec(raw: dict) -> SweepSpec:
    if "base_recipe" not in raw:
        raise ConfigError("a sweep needs 'base_recipe' (a recipe name or YAML path)")
    resolve_recipe_path(str(raw["base_recipe"]))
    metric = raw.get("metric", "val_top1")
    if metric not in METRICS:
        raise ConfigError(f"sweep 'metric' must be one of {sorted(METRICS)}, got {metric!r}")
    mode = raw.get("mode", METRICS[metric])
    search = raw.get("search", "random")
    if mode not in ("max", "min") or search not in SEARCHERS:
        raise ConfigError(f"sweep 'mode' must be max|min and 'search' one of {SEARCHERS}")
    space = {key: parse_distribution(key, value) for key, value in (raw.get("space") or {}).items()}
    if not space:
        raise ConfigError("a sweep needs a non-empty 'space' of dotted config keys")
    if search == "optuna" and any(d.kind == "grid" for d in space.values()):
        raise ConfigError("the optuna searcher cannot take 'grid' dimensions; use 'choice'")
    num_samples = coerce("num_samples", raw.get("num_samples", 8), int)
    if num_samples < 1:
        raise ConfigError(f"sweep 'num_samples' must be >= 1, got {num_samples}")
    return SweepSpec(base_recipe=str(raw["base_recipe"]),
                     overrides=list(raw.get("overrides") or []),
                     metric=metric, mode=mode, num_samples=num_samples, search=search,
                     seed=coerce("seed", raw.get("seed", 0), int), asha=_asha(raw.get("scheduler")),
                     max_concurrent_trials=coerce("max_concurrent_trials",
                                                  raw.get("max_concurrent_trials", 0), int),
                     space=space)


def _asha(raw: Any) -> AshaSpec | None:
    if raw in (None, "none", {"type": "none"}):
        return None
    if not isinstance(raw, dict) or raw.get("type") != "asha":
        raise ConfigError(f"sweep 'scheduler' must be {{type: asha, ...}} or none, got {raw!r}")
    grace = coerce("scheduler.grace_period_epochs", raw.get("grace_period_epochs", 1), int)
    factor = coerce("scheduler.reduction_factor", raw.get("reduction_factor", 2), float)
    if grace < 1 or factor <= 1 or not math.isfinite(factor):
        raise ConfigError("ASHA needs grace_period_epochs >= 1 and reduction_factor > 1")
    return AshaSpec(grace, factor)
