"""Typed experiment configuration: dataclass sections, YAML recipes and dotted CLI overrides.

A recipe is a YAML file whose top-level keys are the section names below. Every value a user
types (in a recipe, an override `optim.lr=0.2` or a tune space) goes through `Config.from_dict`,
which coerces it to the field's type and names the offending key when it cannot.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration value or key the user supplied is wrong; the message says which and why."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    """Source: `digits` (scikit-learn's bundled digits, written as JPEGs), `imagefolder`
    (train/ and val/ class folders, incl. ILSVRC layout), `parquet` (HF-style shards of JPEG bytes
    + label) or `imagenette` (downloaded from its public URL and cached)."""
    root: str = "~/.cache/rn50/digits"
    """Directory (or s3:// URI for parquet) holding the data set; `~` is expanded."""
    num_classes: int = 10
    """Number of output classes of the classifier head."""
    train_crop_px: int = 32
    """Side of the square RandomResizedCrop used for training, in pixels."""
    val_resize_px: int = 32
    """Shorter side the validation image is resized to before the center crop, in pixels."""
    val_crop_px: int = 32
    """Side of the square validation center crop, in pixels."""
    min_crop_scale: float = 0.08
    """Smallest fraction of the image area RandomResizedCrop may keep."""
    hflip: bool = True
    """Random horizontal flip during training (off for digits, where it changes the class)."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength; 0 disables it."""
    loader_workers: int = 0
    """DataLoader worker processes per training worker (0 decodes in the training process)."""
    decode_on_device: bool = False
    """Decode training JPEGs on the training device (nvJPEG via torchvision.io.decode_jpeg) instead
    of in loader workers, which then only read bytes and draw the augmentation (same draws, exact
    resume); frees CPU on GPU nodes that are input-bound. On CPU workers it decodes in the training
    process. Validation images are always decoded on the CPU."""
    max_train_samples: int = 0
    """Use only the first N training samples (after a fixed shuffle); 0 uses all."""
    max_val_samples: int = 0
    """Use only the first N validation samples; 0 uses all."""
    imagenette_size_px: int = 160
    """Which Imagenette archive to download: 160, 320 or 0 for full size."""
    progressive_min_px: int = 0
    """Progressive resizing (FFCV): the train crop side up to `progressive_start_epoch`, growing
    linearly (in steps of 32 px) to `train_crop_px` at `progressive_end_epoch`; 0 disables it."""
    progressive_start_epoch: int = 0
    """Last epoch (0-based) trained at `progressive_min_px`."""
    progressive_end_epoch: int = 0
    """First epoch (0-based) trained at the full `train_crop_px`."""


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """`resnet50` (torchvision v1.5), `resnet50d` (deep stem + avg-pool downsample) or
    `resnet50_blurpool` (a blur before every strided conv, as FFCV trains it)."""
    zero_init_residual: bool = True
    """Start each residual block's last BN gamma at 0 so blocks begin as identities."""
    channels_last: bool = True
    """Use channels_last memory format when training on a GPU (ignored on CPU)."""


@dataclass
class OptimConfig:
    lr: float = 0.1
    """Peak learning rate for a global batch of `lr_reference_batch_size` images."""
    lr_reference_batch_size: int = 256
    """Batch size `lr` refers to; the peak LR scales linearly with global_batch_size / this."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Use Nesterov momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay applied by SGD."""
    no_bn_bias_decay: bool = False
    """Exclude BatchNorm parameters and biases from weight decay."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy target, in [0, 1)."""


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 5.0
    """Linear warmup from `warmup_start_fraction` × peak LR to the peak, in epochs."""
    warmup_start_fraction: float = 0.1
    """LR at step 0 as a fraction of the peak LR."""
    decay: str = "step"
    """After warmup: `step` (×step_gamma at each milestone), `cosine` or `linear` to final_lr_fraction."""
    step_milestones_epochs: list[int] = field(default_factory=lambda: [30, 60, 80])
    """Epochs at which `step` decay multiplies the LR by step_gamma."""
    step_gamma: float = 0.1
    """Multiplier applied at each step milestone."""
    final_lr_fraction: float = 0.0
    """LR at the end of cosine/linear decay as a fraction of the peak LR."""


@dataclass
class TrainConfig:
    epochs: int = 90
    """Number of passes over the training set."""
    global_batch_size: int = 256
    """Images per optimizer step summed over all workers."""
    seed: int = 0
    """Seed for weights, data order and augmentation."""
    amp: bool = True
    """Mixed-precision autocast when training on a GPU (ignored on CPU, which trains in fp32)."""
    amp_dtype: str = "bfloat16"
    """Autocast dtype: `bfloat16` (A100, H100, A10G, L4) or `float16` with a dynamic loss scaler
    (T4 and V100, which have no fast bf16); the scaler's state is checkpointed."""
    compile: bool = False
    """Wrap the model in `torch.compile` (works on CPU too, after a compile of ~1 min for
    ResNet-50). Off by default until a GPU measurement shows it faster (benchmarks/README.md)."""
    ema_decay: float = 0.0
    """Per-step decay of an exponential moving average of the weights; 0 disables EMA."""
    torch_threads: int = 1
    """torch intra-op threads per training worker (OMP_NUM_THREADS)."""
    log_every_steps: int = 50
    """Print a progress line every N steps on rank 0."""


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one process each, one GPU each when use_gpu)."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per training worker."""
    use_gpu: bool = False
    """Reserve one GPU per worker; the device is still chosen from what torch sees."""
    accelerator_type: str = ""
    """Ray accelerator type the workers must run on (e.g. `A10G`); empty for any."""
    start_timeout_s: float = 600.0
    """How long one start of the worker group (the first, or after a failure or a preemption)
    may wait for its resources, in seconds, before the run ends with exit code 4 and a message
    naming what is missing. Ray removes the attempt's placement group when it times out. On an
    autoscaling cluster it must cover a node's launch and setup (~10 minutes on AWS)."""
    prefer_spot: bool = False
    """Ask first for nodes labelled `rn50/market=spot` (cluster.yaml's spot types), then, when
    none start within `spot_wait_s`, for nodes labelled `rn50/market=on-demand`. Off: any node
    that fits, labelled or not."""
    spot_wait_s: float = 900.0
    """How long a start waits for spot nodes before falling back to on-demand ones, in seconds
    (with `prefer_spot`); it must cover a spot node's launch and setup."""


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """Save a checkpoint every N epochs (and always after the last one)."""
    every_steps: int = 0
    """Also save one every N optimizer steps within an epoch (exact mid-epoch resume); 0 = off."""
    every_minutes: float = 0.0
    """Also save one when this many minutes have passed since the last save; 0 = off."""
    preemption_check_every_steps: int = 10
    """Ask Ray every N steps whether a node of the run is being preempted (a spot reclaim
    notice) and checkpoint at once if so; 0 = never ask."""
    keep_last: int = 2
    """How many recent checkpoints Ray keeps in storage."""
    max_failures: int = 3
    """How many worker-group failures a run survives by restarting from its latest checkpoint."""
    max_preemption_failures: int = -1
    """How many preemptions (a drained node, e.g. a spot reclaim) a run survives, counted apart
    from `max_failures`; -1 = unlimited (Ray's `FailureConfig.max_preemption_failures`)."""
    preemption_poll_s: float = 5.0
    """How often Ray Train looks for draining nodes of the run, in seconds (Ray's
    RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S); part of the notice-to-checkpoint delay."""
    relax_collectives_on_preemption: bool = False
    """Let the ranks on healthy nodes finish Ray Train's report/preemption barriers without the
    ranks of a node being preempted (Ray's flag; ignored when rank 0's node is preempted)."""
    preemption_grace_s: float = 0.0
    """How long the surviving workers keep running past a drain's deadline before Ray Train
    restarts the run, in seconds (Ray's `FailureConfig.preemption_grace_s`)."""


@dataclass
class TrackingConfig:
    experiment: str = "rn50"
    """MLflow experiment name."""
    uri: str = ""
    """MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db."""
    log_model: bool = True
    """Log the final model to MLflow at the end of the run."""


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
    "model.arch": ("resnet50", "resnet50d", "resnet50_blurpool"),
    "train.amp_dtype": ("bfloat16", "float16"),
    "schedule.decay": ("step", "cosine", "linear"),
}
_POSITIVE = ("data.num_classes", "data.train_crop_px", "data.val_resize_px", "data.val_crop_px",
             "optim.lr", "optim.lr_reference_batch_size", "train.epochs",
             "train.global_batch_size", "train.torch_threads", "train.log_every_steps",
             "scaling.num_workers", "scaling.cpus_per_worker", "checkpoint.every_epochs",
             "checkpoint.keep_last")
_NON_NEGATIVE = ("data.loader_workers", "data.max_train_samples", "data.max_val_samples",
                 "checkpoint.every_steps", "checkpoint.every_minutes",
                 "checkpoint.preemption_check_every_steps",
                 "optim.momentum", "optim.weight_decay", "schedule.warmup_epochs",
                 "schedule.warmup_start_fraction", "schedule.final_lr_fraction",
                 "checkpoint.max_failures", "train.seed")
_FRACTIONS = ("optim.label_smoothing", "train.ema_decay", "data.min_crop_scale")


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
    if config.train.global_batch_size % config.scaling.num_workers:
        raise ConfigError(f"'train.global_batch_size' ({config.train.global_batch_size}) must be "
                          f"divisible by 'scaling.num_workers' ({config.scaling.num_workers})")
    if config.data.val_crop_px > config.data.val_resize_px:
        raise ConfigError("'data.val_crop_px' must not exceed 'data.val_resize_px'")
    data = config.data
    if data.progressive_min_px and not (
            0 < data.progressive_min_px <= data.train_crop_px
            and 0 <= data.progressive_start_epoch <= data.progressive_end_epoch):
        raise ConfigError("progressive resizing needs 0 < 'data.progressive_min_px' <= "
                          "'data.train_crop_px' and 0 <= 'data.progressive_start_epoch' <= "
                          "'data.progressive_end_epoch'")
    _validate_capacity(config)


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
