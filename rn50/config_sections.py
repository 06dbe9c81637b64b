"""The sections of an experiment config: typed dataclasses, one docstring per field.

Units are in the names (`_px`, `_s`, `_epochs`, `_prob`); every field's meaning is its docstring.
`rn50.config` assembles them into `Config`, coerces and validates what users type, and loads
recipes; import the sections from there.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

AUTO = "auto"
"""The value of `train.torch_threads` / `data.loader_workers` sized on the worker from its CPUs."""

# Every field with a fixed set of values declares it here, once: `coerce` refuses anything else
# (the message lists these), and the code that switches on a field checks it covers its choices.
DataSource = Literal["digits", "imagefolder", "parquet", "imagenette"]
ImagenetteSize = Literal[160, 320, 0]
AutoAugment = Literal["none", "trivialaugment_wide", "randaugment", "autoaugment"]
Arch = Literal["resnet50", "resnet50d", "resnet50_blurpool"]
AmpDtype = Literal["bfloat16", "float16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Decay = Literal["step", "cosine", "linear"]
KeepBestBy = Literal["val_top1", "val_top1_ema", "none"]


def choices(alias: typing.Any) -> tuple:
    """The allowed values of a `Literal[...]` choice, in their declared order."""
    return typing.get_args(alias)


@dataclass
class DataConfig:
    dataset: DataSource = "digits"
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
    auto_augment: AutoAugment = "none"
    """Per-image policy after crop/flip/jitter (torchvision.transforms.v2, bilinear): `none`,
    `trivialaugment_wide`, `randaugment` (2 ops, magnitude 9) or `autoaugment` (ImageNet policy)."""
    random_erasing_prob: float = 0.0
    """Probability that RandomErasing blanks one rectangle (2-33% of the area) of a training image
    with the ImageNet mean colour, on the uint8 crop; 0 disables it."""
    repeated_augmentations: int = 1
    """Repeated augmentation (RASampler): each epoch draws len(dataset)/N images and shows each
    N times with different augmentations, on different ranks; the epoch length is unchanged.
    With parquet shards the N copies stay on one rank, within its row groups. 1 disables it."""
    loader_workers: int | str = 0
    """DataLoader worker processes per training worker (0 decodes in the training process), or
    `auto`: sized on the worker from its CPUs (rn50.data.cpu_budget): on a GPU node its share of
    the node's CPUs per GPU less 2 (p4d: 10, p5: 22, g5.2xlarge: 6), on the CPU 0."""
    decode_on_device: bool = False
    """Decode training JPEGs on the training device (nvJPEG via torchvision.io.decode_jpeg) instead
    of in loader workers, which then only read bytes and draw the augmentation (same draws, exact
    resume); frees CPU on GPU nodes that are input-bound. On CPU workers it decodes in the training
    process. Validation images are always decoded on the CPU."""
    max_train_samples: int = 0
    """Use only the first N training samples (after a fixed shuffle); 0 uses all."""
    max_val_samples: int = 0
    """Use only the first N validation samples; 0 uses all."""
    imagenette_size_px: ImagenetteSize = 160
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
    arch: Arch = "resnet50"
    """`resnet50` (torchvision v1.5), `resnet50d` (deep stem + avg-pool downsample) or
    `resnet50_blurpool` (a blur before every strided conv, as FFCV trains it)."""
    zero_init_residual: bool = True
    """Start each residual block's last BN gamma at 0 so blocks begin as identities."""
    channels_last: bool = True
    """Use channels_last memory format when training on a GPU (ignored on CPU)."""
    stochastic_depth_prob: float = 0.0
    """Stochastic depth: probability of dropping the deepest residual block's branch per sample
    in training; block l of L drops with l/L times this (Huang et al. 2016). 0 disables it."""


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
    decay: Decay = "step"
    """After warmup: `step` (×step_gamma at each milestone), `cosine` or `linear` to
    final_lr_fraction."""
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
    """Images per optimizer step summed over all workers, whatever their number."""
    micro_batch_size: int = 0
    """Images per forward/backward on one worker (the batch BatchNorm normalises over); 0 =
    global_batch_size / the most workers (`scaling.num_workers`). A step is global_batch_size /
    micro_batch_size micro-batches, dealt round-robin to the workers there are, each worker
    accumulating the gradients of its share: the same step at any world size."""
    seed: int = 0
    """Seed for weights, data order and augmentation."""
    amp: bool = True
    """Mixed-precision autocast when training on a GPU (ignored on CPU, which trains in fp32)."""
    amp_dtype: AmpDtype = "bfloat16"
    """Autocast dtype: `bfloat16` (A100, H100, A10G, L4) or `float16` with a dynamic loss scaler
    (T4 and V100, which have no fast bf16); the scaler's state is checkpointed."""
    compile: bool = False
    """Wrap the model in `torch.compile` with fixed shapes (works on CPU too, after a compile of
    ~1 min for ResNet-50): training batches of the micro-batch size are compiled, once per
    resolution (each compile is logged); eval and short batches run eager. Off by default until a
    GPU measurement shows it faster (benchmarks/README.md)."""
    ema_decay: float = 0.0
    """Per-step decay of an exponential moving average of the weights; 0 disables EMA."""
    mixup_alpha: float = 0.0
    """MixUp: Beta(alpha, alpha) concentration of the per-batch mixing weight; 0 disables it."""
    cutmix_alpha: float = 0.0
    """CutMix: Beta(alpha, alpha) concentration of the pasted box's area share; 0 disables it.
    With MixUp also on, each batch gets one of the two, chosen with equal probability."""
    torch_threads: int | str = 1
    """torch intra-op threads per training worker (OMP_NUM_THREADS), or `auto`: 1 on a GPU (the
    step runs on the device), the worker's reserved CPUs on the CPU (rn50.data.cpu_budget)."""
    log_every_steps: int = 50
    """Every N steps: a progress line on rank 0 and the per-step MLflow metrics (train/loss, lr,
    images_per_s, data_wait_fraction) at the global step."""
    ray_log_level: LogLevel = "WARNING"
    """Ray Train's own console messages (a line per report and per checkpoint from every worker)
    at this level and above; Ray's log files under the session folder keep every level."""
    budget_usd: float = 0.0
    """Stop the run cleanly (checkpoint, exit code 5) at the epoch end where the cost so far plus
    the projected cost of the next epoch would exceed this many US dollars; running the same
    command again with a higher budget continues it. 0 = no budget (see the `cost` section)."""


@dataclass
class ScalingConfig:
    num_workers: int | list[int] = 2
    """Ray Train workers (one process each, one GPU each when use_gpu): a fixed number, or
    `[min, max]` for an elastic group that starts with what it gets (>= min), goes on with fewer
    workers when a node is lost and grows back to max when capacity returns. The optimisation is
    the same at every size: see `train.micro_batch_size`."""
    resize_check_s: float = 60.0
    """Elastic groups: how often Ray Train looks for room to grow, in seconds (Ray's
    `elastic_resize_monitor_interval_s`). Growing restarts the group from the latest checkpoint,
    so pair it with `checkpoint.every_minutes` to bound the steps a growth repeats."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per training worker."""
    use_gpu: bool = False
    """Reserve one GPU per worker and train on it. A worker where torch sees no GPU stops the
    run before its first step (exit code 6), unless `cpu_stands_in_for_gpu`."""
    accelerator_type: str = ""
    """Ray accelerator type the workers must run on (e.g. `A10G`); empty for any."""
    start_timeout_s: float = 600.0
    """How long a start of the worker group (the first, or after a failure or a preemption)
    waits for room while no node is being launched for it, in seconds, before the run ends with
    exit code 4 and a message naming what is missing. Nodes that are launching, booting or
    installing are waited for by `node_start_timeout_s` instead."""
    node_start_timeout_s: float = 1200.0
    """How long a start waits for a node the autoscaler is launching for it (requested, booting,
    pulling the image, installing Ray and the project), in seconds: a cold GPU node on AWS takes
    ~5-10 minutes. Past it, a spot start falls back to on-demand and any other gives up."""
    start_check_s: float = 30.0
    """How often a waiting start looks at what the autoscaler is doing for it and says so on the
    console, in seconds (Ray Train's worker-group start timeout: each look restarts the wait)."""
    prefer_spot: bool = False
    """Ask first for nodes labelled `rn50/market=spot` (cluster.yaml's spot types), then for
    nodes labelled `rn50/market=on-demand` when spot cannot be had (see `spot_wait_s`,
    `spot_refusals_to_fall_back`); a run that fell back asks for spot again at its next restart.
    Applies only where nodes carry market labels or an autoscaler can launch labelled ones;
    elsewhere (a workstation's Ray) the run says so once and takes any node."""
    spot_wait_s: float = 900.0
    """How long a spot start waits while no spot node is being launched for it, in seconds,
    before falling back to on-demand nodes (with `prefer_spot`)."""
    spot_refusals_to_fall_back: int = 2
    """How many spot launches the cloud refuses (e.g. InsufficientInstanceCapacity) before the
    run falls back to on-demand nodes, without waiting out `spot_wait_s`."""
    cpu_stands_in_for_gpu: bool = False
    """Rehearsals only: a worker that asked for a GPU (`use_gpu`) on a node where torch sees none
    trains on the CPU, saying so, instead of stopping the run (exit code 6). cluster.local.yaml's
    fake GPU nodes need it (the `rehearsal` recipe sets it); on a real cluster it would let a
    p4d train on its CPUs."""

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with (what it asks Ray for)."""
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        """Whether the worker group may change size during the run."""
        return self.min_workers != self.max_workers


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """Save a checkpoint every N epochs (and always after the last one)."""
    every_steps: int = 0
    """Also save one every N optimizer steps within an epoch (exact mid-epoch resume); 0 = off."""
    every_minutes: float = 0.0
    """Also save one when this many minutes have passed since the last save; 0 = off. The clock
    is read every `preemption_check_every_steps` steps (10 when that is 0), never every step."""
    preemption_check_every_steps: int = 10
    """Ask Ray every N steps whether a node of the run is being preempted (a spot reclaim
    notice) and checkpoint at once if so; 0 = never ask."""
    keep_last: int = 2
    """How many recent checkpoints Ray keeps in storage."""
    keep_best_by: KeepBestBy = "val_top1"
    """Also keep the epoch-end checkpoint that is best by this validation metric, in the run's
    `best/` folder, never pruned while it is the best: `val_top1` (the trained weights),
    `val_top1_ema` (the EMA weights, evaluated each epoch; needs train.ema_decay > 0) or `none`."""
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
    log_gallery: bool = True
    """Log the misclassification gallery (the most confident mistakes, with Grad-CAM) at the end
    of the run: a pass of the driver's CPU over up to 2,000 validation images (~5 s)."""
    system_metrics_interval_s: float = 10.0
    """Seconds between samples of MLflow's system metrics (CPU, memory, disk, network; GPU
    utilisation, memory and power when a GPU is present), taken on every node of the run and
    logged as system/node-<ray node id>/...; 0 turns them off."""


@dataclass
class CostConfig:
    price_table: str = "builtin"
    """Where node types get their EC2 instance type and on-demand price: `builtin`
    (rn50/node_types.yaml: every node type of cluster.yaml, with the region and date its prices
    were read), a path to a YAML file of the same shape, or `none`. Every recipe uses it; a run
    on a node type it cannot price is refused before anything starts (exit code 2)."""
    usd_per_hour: dict[str, float] = field(default_factory=dict)
    """US dollars per hour of Ray node types (the node's `ray.io/node-group` label: the
    `available_node_types` names of cluster.yaml), over the price table's: a recipe's own prices,
    or node types the table lacks. For spot node types this is the price used when no live
    spot price can be had."""
    local_usd_per_hour: float = 0.0
    """US dollars per hour of a node with no node type (a laptop, a hand-started `ray start`)."""
    ec2_instance_types: dict[str, str] = field(default_factory=dict)
    """EC2 instance types of node types the price table lacks (e.g. `gpu.custom.spot:
    g5.12xlarge`): their spot nodes are priced from `describe-spot-price-history`."""
    region: str = ""
    """AWS region of the spot price lookup; empty = $AWS_REGION, $AWS_DEFAULT_REGION, else the
    instance's own region (EC2's metadata service)."""
    ec2_endpoint_url: str = ""
    """EC2 API endpoint of the spot price lookup; empty = AWS's own (set for tests and proxies)."""
    log_every_s: float = 60.0
    """How often the driver logs `cost/usd` (and `cost/usd_per_hour`) to MLflow, in seconds."""
