"""The real-data section of benchmarks/gpu_throughput.py: the project's loader feeding the step.

Inputs: the JPEGs of `--images DIR` (real photos) when given, else generated ImageNet-size JPEGs
(benchmarks/images.py); read from files (the image-folder path) and from prepared parquet shards
(<= 256 px, what `prepare_imagenet` writes), each cycled to a long epoch (a shard set's row
groups are repeated, so the loader's row-group sampler reads them as it reads ImageNet's). For
each source, through `rn50.data.epoch_loader.EpochLoader` with `--workers` processes (11: a p4d's
12 vCPUs per GPU, one left to the training process):

1. the loader alone, in steady state: 2 x workers batches dropped (their decoding started before
   any clock could), then timed: images/s and images/s per worker;
2. the loader feeding bf16 training at the first px and largest batch: 2 x workers warm-up steps,
   then timed (>= 20 s on a GPU): images/s, `data_wait_fraction` (host time spent waiting for
   batches over the timed window) and the ratio to the synthetic step.

`shards_decode_on_device` is the shards with `data.decode_on_device` (nvJPEG in the step).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path


from benchmarks.gpu_sections import Bench, bench_config, training_state
from benchmarks.gpu_timing import EnoughSteps, StepTimer, WaitClock, synchronize
from rn50.core.engine import train_one_epoch
from rn50.data.datasets import ParquetDataset
from rn50.data.epoch_loader import EpochLoader


class CycledShards(ParquetDataset):
    """Prepared shards read `cycles` times over: row groups repeated, rows offset per cycle."""

    def __init__(self, root: Path, transform, cycles: int):
        super().__init__(root, "train", transform, num_classes=1)
        self.rows, self.cycles = self._len, cycles

    def __len__(self) -> int:
        return self.rows * self.cycles

    def row_group_ranges(self) -> list[range]:
        """Every row group once per cycle, at that cycle's offset."""
        base = super().row_group_ranges()
        return [range(r.start + c * self.rows, r.stop + c * self.rows)
                for c in range(self.cycles) for r in base]

    def __getitem__(self, index: int):
        return super().__getitem__(index % self.rows)


def _sources(bench: Bench, px: int, epoch_images: int) -> dict:
    """name -> train dataset at `px`: files, shards, and shards decoded on the device."""
    from benchmarks.images import CycledFiles, find_jpegs, generate_jpegs
    from benchmarks.pipeline import write_prepared_shard
    from rn50.data.device_decode import DeviceDecodePreset
    from rn50.data.transforms import train_transform
    if bench.images_dir is not None:
        paths = find_jpegs(bench.images_dir)
    else:
        (bench.work / "jpegs").mkdir(exist_ok=True)
        paths = generate_jpegs(bench.work / "jpegs", 24 if bench.smoke else 1000)
    shard_root, _ = write_prepared_shard(paths, bench.work / "shards", num_shards=4)
    cfg = bench_config(8, px).data
    cycles = max(1, -(-epoch_images // len(paths)))
    return {"files": CycledFiles(paths, cycles * len(paths), train_transform(cfg)),
            "shards": CycledShards(shard_root, train_transform(cfg), cycles),
            "shards_decode_on_device": CycledShards(shard_root, DeviceDecodePreset(cfg), cycles)}


def loader_alone(loader, drop: int, min_steps: int, min_s: float, batch: int) -> float:
    """Steady-state images/s of a loader by itself: `drop` batches first, then timed."""
    iterator = iter(loader)
    for _ in range(drop):
        next(iterator)
    start_s, steps = time.perf_counter(), 0
    for _ in iterator:
        steps += 1
        if steps >= min_steps and time.perf_counter() - start_s >= min_s:
            break
    return steps * batch / (time.perf_counter() - start_s)


def fed_training(bench: Bench, loader, px: int, batch: int, warmup: int, min_s: float) -> dict:
    """bf16 training fed by `loader`: StepTimer figures plus the data-wait fraction."""
    config = bench_config(batch, px)
    state = training_state(config, bench.device)
    timer = StepTimer(bench.device, warmup, bench.min_steps, min_s)
    clock = WaitClock(loader)
    try:
        train_one_epoch(state, clock, bench.device, config, after_step=timer)
    except EnoughSteps:
        pass
    synchronize(bench.device)
    result = timer.result(batch)
    window = (timer.host_s[warmup], timer.host_s[warmup + result["timed_steps"]])
    result["data_wait_fraction"] = clock.wait_between(*window) / (window[1] - window[0])
    return result


def section_real_data(bench: Bench, report, synthetic_images_per_s: float | None) -> dict:
    """Every source: the loader alone, then feeding training (module docstring)."""
    px, batch, workers = bench.px[0], bench.batches[-1], bench.workers
    drop, min_s = 2 * workers, (bench.min_s if bench.smoke else max(bench.min_s, 20.0))
    epoch_images = (drop + bench.min_steps) * batch * 4 if bench.smoke else 400_000
    figures = {"real_workers": workers, "real_px": px, "real_batch": batch}
    for name, dataset in _sources(bench, px, epoch_images).items():
        loaders = EpochLoader(dataset, batch, rank=0, world_size=1, seed=0, train=True,
                              loader_workers=workers,
                              channels_last=bench.device.type == "cuda")
        alone = loader_alone(loaders.epoch(0), drop, bench.min_steps, min(min_s, 10.0), batch)
        figures[f"{name}_loader_images_per_s"] = alone
        figures[f"{name}_loader_images_per_s_per_worker"] = alone / max(workers, 1)
        result = fed_training(bench, loaders.epoch(1), px, batch, drop, min_s)
        figures[f"{name}_train_images_per_s"] = result["images_per_s"]
        figures[f"{name}_data_wait_fraction"] = result["data_wait_fraction"]
        figures[f"{name}_mfu"] = bench.mfu(result["images_per_s"], px)
        if synthetic_images_per_s:
            figures[f"{name}_vs_synthetic"] = result["images_per_s"] / synthetic_images_per_s
        report(figures)
        del loaders
        gc.collect()  # its worker processes end here, before the next source's start
    return figures
