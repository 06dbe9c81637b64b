"""The input pipelines `benchmarks/run.py` times, on the same JPEG files:

- **baseline**: what a user writes: ImageFolder's `pil_loader` + torchvision's RandomResizedCrop,
  flip, ToTensor, Normalize, through a DataLoader.
- **ours**: the project's ImageFolder path on the same files:
  `rn50.data.datasets.decode_sample`, i.e. `train_transform(...).decode` (crop drawn first,
  libjpeg-turbo decode of only the crop's region at the DCT scale the crop allows, crop +
  resize in one step; rn50.data.turbo_decode), uint8 out, normalised per batch.
- **ours_whole**: the same, with the whole-image decode (simplejpeg) that runs where the region
  decoder (rn50_jpeg_region) was not built: what decoding only the region buys.
- **shards**: the project's ImageNet path: the files as `prepare_imagenet` writes them (parquet
  shards, shorter side re-encoded to <= `SHARD_MAX_PX`), read by `rn50.datasets.ParquetDataset`.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import pil_loader

from rn50.config import DataConfig
from rn50.data.loaders import collate_skip_corrupt
from rn50.data.datasets import ParquetDataset, decode_sample
from rn50.data.imagenet_shards import ROW_GROUP_ROWS, shrink
from rn50.data import turbo_decode
from rn50.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, train_transform

BATCH_SIZE = 64
SHARD_MAX_PX = 256  # `ray_jobs/prepare_imagenet.py --max-px`'s default
PIPELINES = ("baseline", "ours", "ours_whole", "shards")


def data_config(crop_px: int) -> DataConfig:
    """The project's train settings at `crop_px`, colour jitter off (the baseline has none)."""
    return DataConfig(train_crop_px=crop_px, min_crop_scale=0.08, hflip=True, color_jitter=0.0)


def baseline_transform(data_cfg: DataConfig) -> T.Compose:
    """What a user writes: RandomResizedCrop + flip + ToTensor + Normalize, same crop scale."""
    return T.Compose([T.RandomResizedCrop(data_cfg.train_crop_px,
                                          scale=(data_cfg.min_crop_scale, 1.0)),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class BaselineDataset(Dataset):
    """ImageFolder-style: `pil_loader` (PIL open + convert RGB), then the user's transform."""

    def __init__(self, paths: list[Path], data_cfg: DataConfig):
        self.paths, self.transform = paths, baseline_transform(data_cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(pil_loader(self.paths[index])), 0


class OursDataset(Dataset):
    """The project's path: `rn50.data.datasets.decode_sample` (the preset's crop-first decode)."""

    def __init__(self, paths: list[Path], data_cfg: DataConfig):
        self.paths, self.preset = paths, train_transform(data_cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = str(self.paths[index])
        return decode_sample(path, 0, self.preset, self.preset.draft_px, path)


def write_prepared_shard(paths: list[Path], out_dir: Path,
                         num_shards: int = 1) -> tuple[Path, float]:
    """`paths` as `prepare_imagenet` train shards under `out_dir`; returns (root, seconds).

    Each image goes through `rn50.imagenet_shards.shrink` (the prepare step's re-encode; once per
    file, so `paths` may repeat a file to make a bigger data set) and the shards have its
    row-group size, so reading them costs what reading prepared shards costs."""
    start_s = time.perf_counter()
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    shrunk = {path: shrink(path.read_bytes(), SHARD_MAX_PX) for path in set(paths)}
    for shard in range(num_shards):
        chunk = paths[shard::num_shards]
        images = [{"bytes": shrunk[path], "path": path.name} for path in chunk]
        table = pa.table({"image": images, "label": [0] * len(chunk)})
        pq.write_table(table, out_dir / "train" / f"shard-{shard:05d}.parquet",
                       row_group_size=ROW_GROUP_ROWS)
    return out_dir, time.perf_counter() - start_s


def build_loader(pipeline: str, paths: list[Path], shard_root: Path, crop_px: int) -> DataLoader:
    """A one-process DataLoader (num_workers=0) of `pipeline` at `crop_px`."""
    cfg = data_config(crop_px)
    if pipeline == "baseline":
        return DataLoader(BaselineDataset(paths, cfg), batch_size=BATCH_SIZE, num_workers=0)
    dataset = OursDataset(paths, cfg) if pipeline.startswith("ours") else \
        ParquetDataset(shard_root, "train", train_transform(cfg), num_classes=1)
    return DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=0,
                      collate_fn=collate_skip_corrupt)


def timed_pass(pipeline: str, paths: list[Path], shard_root: Path,
               crop_px: int) -> tuple[float, int]:
    """Seconds for one full pass of `pipeline` over the images, and how many it yielded."""
    loader = build_loader(pipeline, paths, shard_root, crop_px)
    torch.manual_seed(0)  # every pipeline draws the same augmentation random stream
    images = 0
    whole = mock.patch.object(turbo_decode, "rn50_jpeg_region", None) \
        if pipeline == "ours_whole" else contextlib.nullcontext()
    with whole:
        start_s = time.perf_counter()
        for batch in loader:
            if pipeline != "baseline":
                # Training normalises on the device; counting it here on the CPU keeps the
                # comparison fair (the baseline pays for Normalize inside its transform).
                batch = (normalize(batch[0]),)
            images += batch[0].shape[0]
        return time.perf_counter() - start_s, images


def measure(paths: list[Path], shard_root: Path, crop_px: int, repeats: int) -> dict[str, dict]:
    """Median seconds and images/s per pipeline at `crop_px`, after one untimed warm-up each."""
    seconds: dict[str, list[float]] = {name: [] for name in PIPELINES}
    counts: dict[str, int] = {}
    for pipeline in seconds:  # warm-up: page cache, lazy imports, allocator
        timed_pass(pipeline, paths, shard_root, crop_px)
    for _ in range(repeats):
        # Interleaved, so slow drift in machine load hits every pipeline alike.
        for pipeline in seconds:
            elapsed_s, counts[pipeline] = timed_pass(pipeline, paths, shard_root, crop_px)
            seconds[pipeline].append(elapsed_s)
    return {name: {"images": counts[name], "seconds": statistics.median(times),
                   "spread_s": max(times) - min(times),
                   "images_per_s": counts[name] / statistics.median(times)}
            for name, times in seconds.items()}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes on this machine have used, of which this process), Linux only."""
    try:
        with open("/proc/stat") as handle:
            user, nice, system = (int(v) for v in handle.readline().split()[1:4])
    except OSError:
        return float("nan"), time.process_time()
    return (user + nice + system) / os.sysconf("SC_CLK_TCK"), time.process_time()


def measure_both_sizes(paths: list[Path], shard_root: Path,
                       repeats: int) -> tuple[dict[int, dict], float]:
    """`measure` at 224 and 128 px, and how many cores other processes kept busy meanwhile."""
    machine_cpu_s, own_cpu_s, start_s = *cpu_seconds(), time.perf_counter()
    results = {crop_px: measure(paths, shard_root, crop_px, repeats) for crop_px in (224, 128)}
    # The load average lags by a minute; the CPU time others burnt during the timing is exact.
    others_cpu_s = (cpu_seconds()[0] - machine_cpu_s) - (time.process_time() - own_cpu_s)
    return results, others_cpu_s / (time.perf_counter() - start_s)
