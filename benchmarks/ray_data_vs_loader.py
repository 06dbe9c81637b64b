"""Ray Data vs the project's DataLoader on prepared ImageNet shards (issue 7, item 4).

    python -m benchmarks.ray_data_vs_loader --quick   # 2,000 rows, 2 passes per side (~2 min)
    python -m benchmarks.ray_data_vs_loader           # 8,000 rows, 3 passes per side (~6 min)
    python -m benchmarks.run --ray-data               # the same, into run.py's JSON line

Both sides read the same 16 parquet shards (`prepare_imagenet`'s format: shorter side re-encoded to
<= 256 px, 128-row row groups; the JPEGs repeated to the row count, so per-pass start-up weighs
about what it would in a bigger epoch), decode and augment with the same code
(`rn50.datasets.decode_sample` with `rn50.transforms.train_transform` at `--crop-px`), use two
decoding processes (the 2 cores here) and hand batches of 64 uint8 images to the consuming
process, which normalises them:

- **loader**: `rn50.data.build_loader` over `rn50.datasets.ParquetDataset`, `loader_workers=2`:
  what `rn50.distributed.worker` runs (row-group-aware shuffle, per-(seed, epoch, index)
  augmentation seeds).
- **ray_data**: `ray.data.read_parquet` -> `randomize_block_order` -> `map_batches(decode)` ->
  `iter_torch_batches`, Ray started with `num_cpus=2` (Ray's start-up is not timed).

The sides alternate pass by pass; medians are reported, with images/s both over the whole pass
and after its first batch (start-up excluded). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks.results import write_result
from rn50.data.loaders import build_loader
from rn50.data.datasets import ParquetDataset, decode_sample, image_bytes
from rn50.data.transforms import normalize, train_transform

REPO = Path(__file__).resolve().parents[1]

BATCH_SIZE, DECODE_PROCESSES = 64, 2


def decode_batch(batch: pa.Table, crop_px: int) -> dict[str, np.ndarray]:
    """Ray Data's map function: a pyarrow batch of shard rows -> uint8 images and labels."""
    from benchmarks.pipeline import data_config
    preset = train_transform(data_config(crop_px))
    decoded = [decode_sample(data, label, preset, preset.draft_px, "row")
               for data, label in zip(image_bytes(batch), batch.column("label").to_pylist())]
    decoded = [item for item in decoded if item is not None]
    return {"image": np.stack([image.numpy() for image, _ in decoded]),
            "label": np.array([label for _, label in decoded], dtype=np.int64)}


def _consume(batches) -> tuple[int, float, float]:
    """(images, seconds in all, seconds after the first batch) of normalising every batch."""
    start_s, first_s, images = time.perf_counter(), None, 0
    for images_uint8 in batches:
        normalize(images_uint8)
        images += images_uint8.shape[0]
        first_s = first_s or time.perf_counter()
    return images, time.perf_counter() - start_s, time.perf_counter() - (first_s or start_s)


def loader_pass(shard_root: Path, crop_px: int, epoch: int) -> tuple[int, float, float]:
    """One epoch through the project's DataLoader path."""
    from benchmarks.pipeline import data_config
    dataset = ParquetDataset(shard_root, "train", train_transform(data_config(crop_px)),
                             num_classes=1)
    loader = build_loader(dataset, BATCH_SIZE, rank=0, world_size=1, seed=0, epoch=epoch,
                          train=True, loader_workers=DECODE_PROCESSES)
    return _consume(batch[0] for batch in loader)


def ray_data_pass(shard_root: Path, crop_px: int, epoch: int) -> tuple[int, float, float]:
    """One epoch through Ray Data (Ray already started)."""
    import ray.data
    dataset = ray.data.read_parquet(str(shard_root / "train")).select_columns(["image", "label"])
    dataset = dataset.randomize_block_order(seed=epoch).map_batches(
        decode_batch, batch_size=BATCH_SIZE, batch_format="pyarrow",
        fn_kwargs={"crop_px": crop_px}, num_cpus=1)
    batches = dataset.iter_torch_batches(batch_size=BATCH_SIZE, drop_last=True)
    return _consume(batch["image"] for batch in batches)


def run_benchmark(paths: list[Path], crop_px: int, passes: int, rows: int) -> dict:
    """Prepare 16 shards of `rows` rows cycling through `paths`, time both sides `passes` times
    each, return the figures."""
    import ray

    from benchmarks.pipeline import write_prepared_shard
    from rn50.distributed.ray_setup import init_ray
    work = Path(tempfile.mkdtemp(prefix="rn50-raydata-"))
    # Ray's workers must import `benchmarks.ray_data_vs_loader` to unpickle `decode_batch`.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    runs: dict[str, list[tuple[int, float, float]]] = {"loader": [], "ray_data": []}
    try:
        cycled = [paths[i % len(paths)] for i in range(rows)]
        shard_root, _ = write_prepared_shard(cycled, work / "shards", num_shards=16)
        init_ray(DECODE_PROCESSES, exact=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for epoch in range(passes + 1):  # pass 0 of each side is an untimed warm-up
            for name, run_pass in (("loader", loader_pass), ("ray_data", ray_data_pass)):
                result = run_pass(shard_root, crop_px, epoch)
                if epoch > 0:
                    runs[name].append(result)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    figures: dict = {"crop_px": crop_px, "passes": passes, "distinct_jpegs": len(paths)}
    for name, results in runs.items():
        figures[f"{name}_images"] = results[0][0]
        figures[f"{name}_images_per_s"] = statistics.median(n / total for n, total, _ in results)
        figures[f"{name}_images_per_s_after_first_batch"] = statistics.median(
            (n - BATCH_SIZE) / steady for n, _, steady in results)
    figures["ray_data_vs_loader_ratio"] = figures["ray_data_images_per_s"] / \
        figures["loader_images_per_s"]
    return figures


def main() -> None:
    """Print the figures, then one JSON line."""
    from benchmarks.images import DEFAULT_IMAGES, find_jpegs, generate_jpegs
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 2 passes per side")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of JPEGs")
    parser.add_argument("--crop-px", type=int, default=224)
    args = parser.parse_args()
    paths = find_jpegs(Path(args.images)) if Path(args.images).is_dir() else []
    if not paths:
        paths = generate_jpegs(Path(tempfile.mkdtemp(prefix="rn50-raydata-jpegs-")), 500)
    figures = run_benchmark(paths, args.crop_px, *((2, 2000) if args.quick else (3, 8000)))
    for key, value in figures.items():
        print(f"{key:40s} {round(value, 3)}")
    rounded = {k: round(v, 3) for k, v in figures.items()}
    print(json.dumps(rounded))
    write_result("ray_data_vs_loader" + ("-quick" if args.quick else ""), rounded)


if __name__ == "__main__":
    main()
