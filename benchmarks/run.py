"""Input-pipeline benchmark: images/s per CPU core of the train transforms, a plain torchvision
pipeline (what a user writes) against the project's two paths (benchmarks/pipeline.py: the same
files as an ImageFolder, and the same files as prepared parquet shards), at 224 and 128 px.

    python -m benchmarks.run --quick               # up to 500 images, 3 timed passes (~30 s)
    python -m benchmarks.run                       # all images, 5 timed passes
    python -m benchmarks.run --images DIR --max-images 20 --repeats 1   # smoke check
    python -m benchmarks.run --ray-overhead        # also Ray Train vs plain DDP (+3-6 min)
    python -m benchmarks.run --ckpt-steps          # also step times at S3 checkpoints (+2-4 min)
    python -m benchmarks.run --ray-data            # also Ray Data vs the DataLoader (+2-4 min)

Every pipeline reads the same images in the same order through a DataLoader with num_workers=0 in
one process with torch.set_num_threads(1), so images/s is images/s per core. Writes a PNG of
baseline vs ours crops (benchmarks/out/crops.png) and ends with one JSON line of the figures.
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T
from torchvision.datasets.folder import pil_loader

from benchmarks.images import DEFAULT_IMAGES, find_jpegs, generate_jpegs
from benchmarks.results import write_result
from benchmarks.pipeline import (BATCH_SIZE, PIPELINES, SHARD_MAX_PX,
                                 baseline_transform, data_config, measure_both_sizes,
                                 write_prepared_shard)
from rn50.config import DataConfig
from rn50.data import turbo_decode
from rn50.data.imagenet_shards import shrink
from rn50.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform

REPO = Path(__file__).resolve().parents[1]

GRID_IMAGES = 8
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"


def is_turbo(path: Path) -> bool:
    """Whether the train preset decodes the file with libjpeg-turbo (else Pillow: not a JPEG,
    or a CMYK/YCCK one)."""
    try:
        return simplejpeg.decode_jpeg_header(path.read_bytes())[2] in ("YCbCr", "Gray")
    except ValueError:
        return False


def grid_files(paths: list[Path]) -> list[Path]:
    """GRID_IMAGES evenly spaced files."""
    return paths[::max(1, len(paths) // GRID_IMAGES)][:GRID_IMAGES]


def crop_triple(path: Path, data_cfg: DataConfig, seed: int) -> list[Image.Image]:
    """Baseline, ours and shard train crops of one file, each drawn with the same random seed."""
    torch.manual_seed(seed)
    baseline = baseline_transform(data_cfg)(pil_loader(path))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = [(baseline * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)]
    preset = train_transform(data_cfg)
    for source in (path.read_bytes(), shrink(path.read_bytes(), SHARD_MAX_PX)):
        torch.manual_seed(seed)
        crops.append(preset.decode(source))
    return [T.functional.to_pil_image(crop) for crop in crops]


def write_crop_grid(paths: list[Path], crop_px: int, out_path: Path) -> float | None:
    """PNG of baseline | ours | shards crops; returns mean |pixel diff| (0..255) baseline vs ours:
    both draw the same crop box over the original image, so only decoding and resampling differ."""
    chosen, cfg = grid_files(paths), data_config(crop_px)
    gap_px, label_px, columns = 8, 16, len(PIPELINES)
    cell_w_px, cell_h_px = columns * (crop_px + gap_px) + gap_px, crop_px + label_px + gap_px
    grid = Image.new("RGB", (2 * cell_w_px, (len(chosen) + 1) // 2 * cell_h_px), "white")
    draw, diffs = ImageDraw.Draw(grid), []
    for index, path in enumerate(chosen):
        crops = crop_triple(path, cfg, seed=index)
        # Shard images are decoded from fewer pixels: the same draw, another pixel grid.
        diffs.append(np.abs(np.asarray(crops[0], np.int16) - np.asarray(crops[1], np.int16)).mean())
        labels = [f"baseline {path.name[:22]}", "ours", f"shards (<= {SHARD_MAX_PX} px)"]
        x_px, y_px = (index % 2) * cell_w_px + gap_px, (index // 2) * cell_h_px
        for column, (crop, label) in enumerate(zip(crops, labels)):
            left_px = x_px + column * (crop_px + gap_px)
            draw.text((left_px, y_px + 2), label, fill="black")
            grid.paste(crop, (left_px, y_px + label_px))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return round(float(np.mean(diffs)), 3) if diffs else None


def print_table(results: dict[int, dict], turbo: float) -> None:
    """The human-readable table: one row per pipeline and crop size."""
    print(f"{'pipeline':<11}{'px':>4}{'images':>8}{'seconds':>9}{'images/s/core':>15}"
          f"{'ratio':>7}{'spread_s':>10}  decoded by libjpeg-turbo")
    region = "only the crop's region" if turbo_decode.rn50_jpeg_region else "the whole image"
    for crop_px, by_pipeline in results.items():
        base_per_s = by_pipeline["baseline"]["images_per_s"]
        for name, row in by_pipeline.items():
            draft = "-" if name == "baseline" else f"{turbo:.0%} of files, " + \
                ("the whole image" if name == "ours_whole" else region)
            print(f"{name:<11}{crop_px:>4}{row['images']:>8}{row['seconds']:>9.2f}"
                  f"{row['images_per_s']:>15.1f}{row['images_per_s'] / base_per_s:>7.2f}"
                  f"{row['spread_s']:>10.2f}  {draft}")


def checkpoint_stall_s(repeats: int = 3) -> float:
    """Mean seconds a ResNet-50 checkpoint save blocks training (benchmarks/checkpoint_costs.py)."""
    from benchmarks.checkpoint_costs import resnet50_state, stall_and_size
    state, stalls_s = resnet50_state(), []
    for _ in range(repeats):
        # One save per call: stall_and_size returns (and lets us delete) only its last directory.
        stall_s, _, directory = stall_and_size(state, repeats=1)
        shutil.rmtree(directory)
        stalls_s.append(stall_s)
    return statistics.mean(stalls_s)


def resolve_images(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The benchmark's files and a description of where they came from."""
    directory = Path(args.images) if args.images else DEFAULT_IMAGES
    if directory.is_dir() and find_jpegs(directory):
        paths, source = find_jpegs(directory), str(directory.resolve())
    elif args.images:
        sys.exit(f"no .jpg/.jpeg files under {directory}")
    else:
        count = args.max_images or (500 if args.quick else 1000)
        directory = Path(tempfile.mkdtemp(prefix="rn50-bench-jpegs-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)  # don't litter /tmp
        paths = generate_jpegs(directory, count)
        source = f"{count} generated ImageNet-like JPEGs (seed 0)"
    limit = args.max_images or (500 if args.quick else 0)
    return (paths[:limit] if limit else paths), source


def pipeline_figures(results: dict[int, dict]) -> dict:
    """The JSON figures of the timing: images/s per pipeline and ratios to the baseline."""
    figures = {}
    for crop_px, by_pipeline in results.items():
        base_per_s = by_pipeline["baseline"]["images_per_s"]
        for name, row in by_pipeline.items():
            figures[f"{name}_images_per_s_{crop_px}"] = round(row["images_per_s"], 1)
        figures[f"speedup_same_files_{crop_px}"] = round(
            by_pipeline["ours"]["images_per_s"] / base_per_s, 3)
        figures[f"speedup_same_files_whole_decode_{crop_px}"] = round(
            by_pipeline["ours_whole"]["images_per_s"] / base_per_s, 3)
        figures[f"speedup_shards_{crop_px}"] = round(
            by_pipeline["shards"]["images_per_s"] / base_per_s, 3)
    # The headline is the ImageNet path (prepared shards) at 224 px, the resolution that trains.
    return {"pipeline_speedup": figures["speedup_shards_224"],
            "pipeline_speedup_128": figures["speedup_shards_128"], **figures}


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 images, 3 timed passes")
    parser.add_argument("--images", help=f"folder of JPEGs (default {DEFAULT_IMAGES})")
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N files")
    parser.add_argument("--repeats", type=int, default=0, help="timed passes (default 3 / 5)")
    parser.add_argument("--ckpt-stall", action="store_true",
                        help="also fill ckpt_stall_s (saves a ResNet-50 checkpoint 3 times)")
    parser.add_argument("--ray-overhead", action="store_true",
                        help="also fill ray_overhead_ratio (benchmarks/ray_overhead.py)")
    parser.add_argument("--ckpt-steps", action="store_true",
                        help="also time steps that checkpoint to S3 "
                             "(benchmarks/ckpt_step_times.py)")
    parser.add_argument("--ray-data", action="store_true",
                        help="also time Ray Data vs the DataLoader "
                             "(benchmarks/ray_data_vs_loader.py)")
    parser.add_argument("--grid", default=str(REPO / "benchmarks" / "out" / "crops.png"))
    parser.add_argument("--write-results", action="store_true",
                        help=f"also write the figures, command, machine and date to {RESULTS}")
    return parser.parse_args()


def main() -> None:
    """Time the pipelines at 224 and 128 px, write the grid, print the table and the figures."""
    args = parse_args()
    torch.set_num_threads(1)  # one core: the figure is per core, like one loader worker
    paths, source = resolve_images(args)
    repeats = args.repeats or (3 if args.quick else 5)
    shard_dir = Path(tempfile.mkdtemp(prefix="rn50-bench-shards-"))
    atexit.register(shutil.rmtree, shard_dir, ignore_errors=True)
    shard_root, prepare_s = write_prepared_shard(paths, shard_dir)
    load_before = os.getloadavg()[0]
    print(f"{len(paths)} images from {source}; {repeats} timed passes after 1 warm-up; "
          f"batch {BATCH_SIZE}; 1 thread; {os.cpu_count()} cores; load avg {load_before:.2f}; "
          f"shard prepared (shorter side <= {SHARD_MAX_PX} px) at "
          f"{len(paths) / prepare_s:.0f} images/s, one-off")
    results, other_cores = measure_both_sizes(paths, shard_root, repeats)
    turbo = sum(is_turbo(p) for p in paths) / len(paths)
    crop_diff = write_crop_grid(paths, 224, Path(args.grid))
    print_table(results, turbo)
    print(f"other processes used {other_cores:.2f} of {os.cpu_count()} cores during the timing")
    if any(len({row["images"] for row in r.values()}) > 1 for r in results.values()):
        print("WARNING: the pipelines yielded different image counts (undecodable files?)")
    print(f"crop grid: {args.grid} (baseline vs ours, same crop boxes: mean |diff| "
          f"{crop_diff}/255)")
    stall_s = checkpoint_stall_s() if args.ckpt_stall else None
    ray_figures = {"ray_overhead_ratio": None}
    if args.ray_overhead:  # opt-in: minutes of 2-worker training and a local Ray
        from benchmarks.ray_overhead import run_benchmark
        ray_figures = run_benchmark(quick=args.quick)
    optional = {"ckpt_step_stall_s": None, "ray_data_vs_loader_ratio": None}
    if args.ckpt_steps:  # opt-in: the local S3 server and a 2-worker Ray job
        from benchmarks.ckpt_step_times import run_benchmark as ckpt_steps
        optional.update({k: v for k, v in ckpt_steps(quick=args.quick).items()
                         if k.startswith(("ckpt_step", "upload_step", "step_s_"))})
    if args.ray_data:
        from benchmarks.ray_data_vs_loader import run_benchmark as ray_data
        optional.update(ray_data(paths, 224, *((2, 2000) if args.quick else (3, 8000))))
    not_measured = [name for name, value in (("ray_overhead_ratio",
                                              ray_figures["ray_overhead_ratio"]),
                                             ("ckpt_stall_s", stall_s), *optional.items())
                    if value is None]
    figures = {
        **pipeline_figures(results), "shard_prepare_images_per_s": round(len(paths) / prepare_s, 1),
        "images": len(paths), "repeats": repeats, "crop_mean_abs_diff_224": crop_diff,
        "turbo_decoded_fraction": round(turbo, 3),
        "region_decoder_built": int(turbo_decode.rn50_jpeg_region is not None),
        "load_avg_before": round(load_before, 2), "other_processes_cores": round(other_cores, 2),
        **ray_figures, "ckpt_stall_s": None if stall_s is None else round(stall_s, 3),
        **{k: v if not isinstance(v, float) else round(v, 3) for k, v in optional.items()},
        "not_measured": not_measured}
    if args.write_results:
        write_results(figures, source)
    print(json.dumps(figures))


def write_results(figures: dict, source: str) -> None:
    """RESULTS: the figures with the command, the machine, the date and the images' source."""
    write_result("pipeline", {k: v for k, v in figures.items() if isinstance(v, (int, float))},
                 path=RESULTS, context={"images_from": source, "all_figures": figures})


if __name__ == "__main__":
    main()
