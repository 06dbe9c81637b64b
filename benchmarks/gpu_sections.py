"""The sections of benchmarks/gpu_throughput.py that need no input data: synthetic training steps
(precision x resolution x batch, compile, EMA, MixUp/CutMix, BlurPool, single-rank DDP), eval,
checkpoint saves and the host-sync audit. The real-data sections are in gpu_data.py.

Every training figure runs the project's own `train_one_epoch` (the loop training uses: prefetch,
accumulation rules, EMA, mixing) with a `StepTimer` as its after-step hook (gpu_timing.py), on a
uint8 NHWC batch already on the device, i.e. the step alone.
"""
from __future__ import annotations

import datetime
import itertools
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu_timing import EnoughSteps, StepTimer, synchronize
from rn50.config import Config, load_config
from rn50.core.device import maybe_compile
from rn50.core.engine import build_optimizer, evaluate, train_one_epoch
from rn50.core.model import EMA, build_model, place_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState

NUM_CLASSES = 1000


@dataclass
class Bench:
    """What every section needs: the device, sizes, the timed window, where to work."""
    device: torch.device
    smoke: bool
    px: list[int]
    batches: list[int]
    warmup: int
    min_steps: int
    min_s: float
    workers: int
    work: Path
    images_dir: Path | None = None
    peak_tflops: float | None = None
    compile_backend: str = "inductor"
    flops: dict = field(default_factory=dict)

    def train_flops(self, px: int) -> float:
        """Training FLOPs per image at `px`: 3x the forward FLOPs FlopCounterMode counts."""
        if px not in self.flops:
            model = build_model(load_config("imagenet_90ep").model, NUM_CLASSES).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.zeros(1, 3, px, px))
            self.flops[px] = 3.0 * counter.get_total_flops()
        return self.flops[px]

    def mfu(self, images_per_s: float, px: int) -> float | None:
        """Model FLOPs utilisation against the dense bf16 peak, when one is known."""
        return images_per_s * self.train_flops(px) / (self.peak_tflops * 1e12) \
            if self.peak_tflops else None


def bench_config(batch: int, px: int, *overrides: str) -> Config:
    """imagenet_90ep on one device: bf16 + channels_last unless overridden, no EMA, no logging."""
    return load_config("imagenet_90ep", [
        "train.amp=true", "model.channels_last=true", "train.compile=false",
        f"train.global_batch_size={batch}", "scaling.num_workers=1", "train.ema_decay=0",
        "train.log_every_steps=1000000", f"data.train_crop_px={px}", *overrides])


def training_state(config: Config, device: torch.device, ddp: bool = False,
                   backend: str = "inductor") -> TrainingState:
    """Model (DDP-wrapped / compiled when asked), SGD, schedule, EMA: as the worker builds them."""
    torch.manual_seed(0)
    model = place_model(build_model(config.model, NUM_CLASSES), device, config.model.channels_last)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    model = maybe_compile(model, config.train.compile, config.micro_batch_size, backend)
    optimizer = build_optimizer(model, config)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    return TrainingState(model, optimizer, build_scheduler(optimizer, 10**6, 1, config.schedule),
                         ema=ema)


def synthetic_batches(batch: int, px: int, device: torch.device, channels_last: bool = True):
    """One random uint8 batch on the device (NHWC in memory when `channels_last`, as the loader
    stacks it then), forever: the step alone, no input pipeline."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, px, px, 3), dtype=torch.uint8, generator=generator)
    images = images.permute(0, 3, 1, 2)
    images = images if channels_last else images.contiguous()
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return itertools.repeat((images.to(device), labels.to(device), 0))


def timed_training(bench: Bench, config: Config, batches, ddp: bool = False,
                   warmup: int | None = None) -> dict:
    """Train until the StepTimer has its window; its figures plus the set-up and first step's
    seconds (`first_step_s`: compile time when compiling)."""
    state = training_state(config, bench.device, ddp, bench.compile_backend)
    timer = StepTimer(bench.device, bench.warmup if warmup is None else warmup,
                      bench.min_steps, bench.min_s)
    start_s = time.perf_counter()
    try:
        train_one_epoch(state, batches, bench.device, config, after_step=timer)
    except EnoughSteps:
        pass
    synchronize(bench.device)
    result = timer.result(config.train.global_batch_size)
    result["first_step_s"] = timer.host_s[0] - start_s
    result["mfu"] = bench.mfu(result["images_per_s"], config.data.train_crop_px)
    return result


def _figures(prefix: str, result: dict) -> dict:
    keys = ("images_per_s", "mfu", "host_ms_per_step", "device_ms_per_step", "timed_steps")
    return {f"{prefix}_{key}": result[key] for key in keys}


def section_synthetic(bench: Bench, report) -> dict:
    """bf16 + channels_last at every px x batch, then fp32 (TF32 tensor cores) at the first."""
    figures = {}
    for px, batch in itertools.product(bench.px, bench.batches):
        result = timed_training(bench, bench_config(batch, px), synthetic_batches(
            batch, px, bench.device))
        figures.update(_figures(f"bf16_cl_{px}_b{batch}", result))
        report(figures)  # a run cut short keeps what it measured
    px, batch = bench.px[0], bench.batches[-1]
    fp32 = bench_config(batch, px, "train.amp=false", "model.channels_last=false")
    figures.update(_figures(f"fp32_tf32_{px}_b{batch}", timed_training(
        bench, fp32, synthetic_batches(batch, px, bench.device, channels_last=False))))
    figures["bf16_cl_vs_fp32_tf32"] = figures[f"bf16_cl_{px}_b{batch}_images_per_s"] / \
        figures[f"fp32_tf32_{px}_b{batch}_images_per_s"]
    return figures


FEATURES = {"ema": ["train.ema_decay=0.9999"],
            "mixup_cutmix": ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0"],
            "blurpool": ["model.arch=resnet50_blurpool"]}


def section_features(bench: Bench, report) -> dict:
    """EMA, MixUp/CutMix and BlurPool each on, then single-rank DDP, at the first px, largest
    batch; each beside the plain figure measured just before it."""
    px, batch = bench.px[0], bench.batches[-1]
    plain = timed_training(bench, bench_config(batch, px),
                           synthetic_batches(batch, px, bench.device))
    figures = _figures("plain", plain)
    for name, overrides in FEATURES.items():
        result = timed_training(bench, bench_config(batch, px, *overrides),
                                synthetic_batches(batch, px, bench.device))
        figures.update(_figures(name, result))
        figures[f"{name}_vs_plain"] = result["images_per_s"] / plain["images_per_s"]
        report(figures)
    with _single_rank_group(bench.device):
        result = timed_training(bench, bench_config(batch, px),
                                synthetic_batches(batch, px, bench.device), ddp=True)
    figures.update(_figures("ddp_1rank", result))
    figures["ddp_1rank_vs_plain"] = result["images_per_s"] / plain["images_per_s"]
    return figures


class _single_rank_group:
    """A one-process torch.distributed group: NCCL on CUDA, gloo on CPU."""

    def __init__(self, device: torch.device):
        self.backend = "nccl" if device.type == "cuda" else "gloo"

    def __enter__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group(self.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))

    def __exit__(self, *exc):
        dist.destroy_process_group()


def section_compile(bench: Bench, report) -> dict:
    """torch.compile (fixed shapes) at the first px, largest batch; compile time apart."""
    px, batch = bench.px[0], bench.batches[-1]
    config = bench_config(batch, px, "train.compile=true")
    result = timed_training(bench, config, synthetic_batches(batch, px, bench.device))
    figures = _figures(f"bf16_cl_compile_{px}_b{batch}", result)
    figures["compile_first_step_s"] = result["first_step_s"]
    return figures


def section_eval(bench: Bench, report) -> dict:
    """`evaluate` (the validation loop) img/s: bf16, channels_last, first px, largest batch."""
    px, batch = bench.px[0], bench.batches[-1]
    config = bench_config(batch, px)
    model = training_state(config, bench.device).model
    stream = synthetic_batches(batch, px, bench.device)
    evaluate(model, itertools.islice(stream, bench.warmup), bench.device, channels_last=True,
             amp=True)
    steps, seconds = 0, 0.0
    while steps < bench.min_steps or seconds < bench.min_s:
        synchronize(bench.device)
        start_s = time.perf_counter()
        evaluate(model, itertools.islice(stream, 10), bench.device, channels_last=True, amp=True)
        seconds += time.perf_counter() - start_s  # evaluate ends in a read: its work is done
        steps += 10
    return {f"eval_{px}_b{batch}_images_per_s": steps * batch / seconds}


def section_checkpoint(bench: Bench, report) -> dict:
    """Seconds a ResNet-50 checkpoint (weights, momentum, EMA) holds the training thread:
    write + hash from device tensors (before issue 24) vs the host copy (after)."""
    from rn50.core.background_save import save_in_background
    from rn50.io.checkpoints import files_bytes, save_checkpoint, verify
    px, batch = bench.px[0], bench.batches[0]
    config = bench_config(batch, px, "train.ema_decay=0.9999")
    training = training_state(config, bench.device)
    one_step = itertools.islice(synthetic_batches(batch, px, bench.device), 1)
    train_one_epoch(training, one_step, bench.device, config)  # momentum buffers exist now
    state = training.state_dict(0, 1, config.to_dict())
    work = Path(tempfile.mkdtemp(dir=bench.work))
    synchronize(bench.device)
    start_s = time.perf_counter()
    save_checkpoint(work / "before", state, {})
    before_s = time.perf_counter() - start_s
    start_s = time.perf_counter()
    written = save_in_background(work / "after", state, {})
    stall_s = time.perf_counter() - start_s
    written.result()
    size_mb = files_bytes(verify(work / "before", hashes=False)) / 2**20
    return {"ckpt_size_mb": size_mb, "ckpt_sync_save_s": before_s, "ckpt_stall_s": stall_s,
            "ckpt_background_write_s": time.perf_counter() - start_s}


def section_sync_audit(bench: Bench, report) -> dict:
    """Host syncs per step (benchmarks/host_syncs.py) on the device, with CUDA's own reports:
    the default step, and on a GPU also with MixUp/CutMix and stochastic depth."""
    from benchmarks.host_syncs import VARIANTS, count_host_syncs, sync_config
    px = 32 if bench.smoke else bench.px[0]
    micro = min(64, bench.batches[-1] // 2)  # two micro-batches a step, as accumulation does
    figures, details = {}, {}
    for name in ["default"] if bench.smoke else list(VARIANTS):
        counts = count_host_syncs(sync_config(px, micro, 4, *VARIANTS[name]), 6, bench.device)
        prefix = "" if name == "default" else f"{name}_"
        figures[f"{prefix}syncs_outside_logging_steps"] = counts["syncs_outside_logging_steps"]
        figures[f"{prefix}syncs_at_logging_steps"] = counts["syncs_at_logging_steps"]
        warnings = counts["cuda_sync_warnings_per_step"]
        if warnings is not None:
            figures[f"{prefix}cuda_sync_warnings_outside_logging_steps"] = sum(
                n for s, n in enumerate(warnings) if s not in counts["logging_steps"])
        details[name] = counts
        report(figures, details=details)
    return figures
