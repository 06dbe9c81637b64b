"""Training-step throughput of ResNet-50 on one device: synthetic batches and real JPEGs, at
224/176/128 px, for the precision/layout/compile variants side by side, with MFU.

    python benchmarks/gpu_throughput.py                     # on a GPU: batch 256, 30 timed steps
    python benchmarks/gpu_throughput.py --compile           # + the torch.compile variant
    python benchmarks/gpu_throughput.py --px 64 --batch-size 4 --steps 2   # CPU smoke (~1 min)

Every variant runs the project's `rn50.engine.train_one_epoch` (SGD foreach, per-step schedule,
label smoothing 0.1, 1000 classes) after untimed warm-up steps; the epoch's own timing ends in a
`.item()`, so queued GPU work is inside it. Variants (config overrides of the `imagenet_90ep`
recipe): `fp32` (train.amp=false, NCHW), `bf16_cl` (bf16 autocast + channels_last, the GPU
default), `bf16_cl_compile` (+ torch.compile, with --compile). Synthetic batches are uint8 on the
device already (the step alone); `real_jpeg` feeds `bf16_cl` from prepared parquet shards of
generated ImageNet-size JPEGs through the project's DataLoader with one worker per CPU core
(host decode + pinned copy + the step); `real_jpeg_device_decode` the same with
`data.decode_on_device` (loader workers read bytes and draw crops; nvJPEG decodes on the GPU).
MFU = images/s x training FLOPs per image (3x the forward FLOPs torch's FlopCounterMode counts) /
the device's dense bf16 peak (`--peak-tflops`, else a table of known GPUs; none on CPU). Ends
with one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from rn50.config import Config, load_config  # noqa: E402
from rn50.core.engine import build_optimizer, maybe_compile, train_one_epoch  # noqa: E402
from rn50.core.model import build_model, place_model  # noqa: E402
from rn50.core.schedule import build_scheduler  # noqa: E402
from rn50.core.training_state import TrainingState  # noqa: E402

NUM_CLASSES = 1000
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.5,
                    "H100 NVL": 835.5, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0,
                    "A10": 125.0}
VARIANTS = {"fp32": ["train.amp=false", "model.channels_last=false", "train.compile=false"],
            "bf16_cl": ["train.amp=true", "model.channels_last=true", "train.compile=false"],
            "bf16_cl_compile": ["train.amp=true", "model.channels_last=true", "train.compile=true"]}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak: `override`, else the table entry its name contains."""
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def train_flops_per_image(px: int) -> float:
    """3x the forward FLOPs of one image (backward ~ 2x forward), counted by FlopCounterMode."""
    model = build_model(load_config("imagenet_90ep").model, NUM_CLASSES).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, px, px))
    return 3.0 * counter.get_total_flops()


def variant_config(variant: str, batch_size: int) -> Config:
    """The imagenet_90ep recipe with the variant's switches, on one device."""
    return load_config("imagenet_90ep", [*VARIANTS[variant], f"train.global_batch_size={batch_size}",
                                         "scaling.num_workers=1", "train.ema_decay=0",
                                         "train.log_every_steps=1000000"])


def images_per_s(config: Config, batches, warmup: list, device: torch.device) -> float:
    """Train on `warmup` untimed, then on `batches`; images/s of the timed part."""
    torch.manual_seed(0)
    model = place_model(build_model(config.model, NUM_CLASSES), device, config.model.channels_last)
    model = maybe_compile(model, config.train.compile)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 1000, 1, config.schedule)
    state = TrainingState(model, optimizer, scheduler)
    train_one_epoch(state, warmup, device, config)
    return train_one_epoch(state, batches, device, config).images_per_s


def synthetic(px: int, batch_size: int, steps: int, device: torch.device) -> list:
    """`steps` references to one uint8 batch already on the device, with labels."""
    images = torch.randint(0, 256, (batch_size, 3, px, px), dtype=torch.uint8, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    return [(images, labels, 0)] * steps


def real_jpeg_batches(shard_root: Path, config: Config, px: int, steps: int,
                      decode_on_device: bool = False):
    """`steps` batches of the project's train loader over the shards at `px`, its worker start-up
    excluded (a real epoch pays it once per ~5,000 steps): the first batch is drawn and dropped
    before the caller's clock starts."""
    from rn50.data.loaders import build_loader, set_train_crop_px
    from rn50.data.datasets import ParquetDataset
    from rn50.data.device_decode import DeviceDecodePreset
    from rn50.data.transforms import train_transform
    preset = DeviceDecodePreset(config.data) if decode_on_device else train_transform(config.data)
    dataset = ParquetDataset(shard_root, "train", preset, num_classes=1)
    set_train_crop_px(dataset, px)
    loader = build_loader(dataset, config.train.global_batch_size, rank=0, world_size=1, seed=0, epoch=0, train=True, loader_workers=os.cpu_count() or 1)
    if len(loader) < steps + 1:
        raise SystemExit(f"--images gives {len(loader)} batches of {config.train.global_batch_size}"
                         f"; the real-JPEG figure needs {steps + 1}: raise --images")
    batches = iter(loader)
    next(batches)
    return itertools.islice(batches, steps)


def measure(args: argparse.Namespace, device: torch.device, shard_root: Path | None) -> dict:
    """Every (variant, px) synthetic figure and the real-JPEG one, with MFU where a peak is known."""
    peak = peak_tflops(device, args.peak_tflops)
    variants = [v for v in VARIANTS if v != "bf16_cl_compile" or args.compile]
    figures: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else "cpu", "batch_size": args.batch_size, "steps": args.steps,
                     "peak_bf16_tflops": peak}
    for px in args.px:
        flops = train_flops_per_image(px)
        runs = {v: images_per_s(variant_config(v, args.batch_size),
                                synthetic(px, args.batch_size, args.steps, device),
                                synthetic(px, args.batch_size, args.warmup_steps, device), device)
                for v in variants}
        if shard_root is not None:
            config = variant_config("bf16_cl", args.batch_size)
            for name, on_device in (("real_jpeg", False), ("real_jpeg_device_decode", True)):
                runs[name] = images_per_s(
                    config, real_jpeg_batches(shard_root, config, px, args.steps, on_device),
                    synthetic(px, args.batch_size, args.warmup_steps, device), device)
        for name, per_s in runs.items():
            figures[f"{name}_images_per_s_{px}"] = round(per_s, 1)
            figures[f"{name}_mfu_{px}"] = round(per_s * flops / (peak * 1e12), 4) if peak else None
        figures[f"bf16_cl_vs_fp32_{px}"] = round(runs["bf16_cl"] / runs["fp32"], 3)
        if "real_jpeg" in runs:
            figures[f"real_jpeg_vs_synthetic_{px}"] = round(runs["real_jpeg"] / runs["bf16_cl"], 3)
    return figures


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, nargs="+", default=[224, 176, 128])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per figure")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also the torch.compile variant")
    parser.add_argument("--images", type=int, default=-1,
                        help="generated JPEGs for the real_jpeg figure (default: batch x "
                             "(steps + 1), one epoch; 0: skip it)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    return parser.parse_args()


def main() -> None:
    """Measure on CUDA if present (else CPU), print each figure, then one JSON line."""
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    work = Path(tempfile.mkdtemp(prefix="rn50-gpu-bench-"))
    try:
        shard_root = None
        if args.images < 0:
            args.images = args.batch_size * (args.steps + 1)
        if args.images:
            from benchmarks.pipeline import write_prepared_shard
            from benchmarks.images import generate_jpegs
            (work / "jpegs").mkdir()
            paths = generate_jpegs(work / "jpegs", args.images)
            shard_root, _ = write_prepared_shard(paths, work / "shards", num_shards=4)
        figures = measure(args, device, shard_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in figures.items():
        print(f"{key:36s} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
