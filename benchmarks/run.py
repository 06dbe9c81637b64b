"""Input-pipeline benchmark: images/s per CPU core of the train transforms, a plain torchvision
pipeline (what a user writes) against the project's (`rn50.transforms`), at 224 and 128 px.

    python benchmarks/run.py --quick               # up to 500 images, 3 timed passes (~30 s)
    python benchmarks/run.py                       # all images, 5 timed passes
    python benchmarks/run.py --images DIR --max-images 20 --repeats 1   # smoke check
    python benchmarks/run.py --ray-overhead        # also Ray Train vs plain DDP (+3-6 min)

Both pipelines read the same files in the same order through a DataLoader with num_workers=0 in
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.datasets.folder import pil_loader  # noqa: E402

from rn50.config import DataConfig  # noqa: E402
from rn50.data import collate_skip_corrupt  # noqa: E402
from rn50.datasets import _decode  # noqa: E402
from rn50.transforms import (IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalize,  # noqa: E402
                             train_transform)

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "imagenet-sample"
JPEG_SUFFIXES = (".jpg", ".jpeg")
BATCH_SIZE = 64
GRID_IMAGES = 8


def find_jpegs(directory: Path) -> list[Path]:
    """All JPEG files under `directory` (recursively), sorted so every run sees the same order."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES)


def generate_jpegs(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` seeded ImageNet-like JPEGs (~500x375, smooth content plus grain, quality 90)."""
    rng = np.random.default_rng(seed)
    sizes_px = [(500, 375), (500, 333), (375, 500), (500, 400)]
    paths = []
    for index in range(count):
        width, height = sizes_px[index % len(sizes_px)]
        # Pure noise would decode far slower than photos (no compressible structure), so upsample
        # a tiny random image for photo-like low frequencies and add mild grain for texture.
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = pixels + rng.integers(-12, 13, pixels.shape, dtype=np.int16)
        path = directory / f"synthetic_{index:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


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
    """The project's path: `rn50.datasets._decode` (load_rgb with draft + the uint8 preset)."""

    def __init__(self, paths: list[Path], data_cfg: DataConfig):
        self.paths, self.preset = paths, train_transform(data_cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = str(self.paths[index])
        return _decode(path, 0, self.preset, self.preset.draft_px, path)


def timed_pass(pipeline: str, paths: list[Path], crop_px: int) -> tuple[float, int]:
    """Seconds for one full pass of `pipeline` over `paths`, and the number of images it yielded."""
    cfg = data_config(crop_px)
    if pipeline == "baseline":
        loader = DataLoader(BaselineDataset(paths, cfg), batch_size=BATCH_SIZE, num_workers=0)
    else:
        loader = DataLoader(OursDataset(paths, cfg), batch_size=BATCH_SIZE, num_workers=0,
                            collate_fn=collate_skip_corrupt)
    torch.manual_seed(0)  # both pipelines draw the same augmentation random stream
    images = 0
    start_s = time.perf_counter()
    for batch in loader:
        if pipeline == "ours":
            # Training normalises on the device; counting it here on the CPU keeps the comparison
            # fair (the baseline pays for Normalize inside its transform).
            batch = (normalize(batch[0]),)
        images += batch[0].shape[0]
    return time.perf_counter() - start_s, images


def measure(paths: list[Path], crop_px: int, repeats: int) -> dict[str, dict]:
    """Median seconds and images/s per pipeline at `crop_px`, after one untimed warm-up each."""
    seconds: dict[str, list[float]] = {"baseline": [], "ours": []}
    counts: dict[str, int] = {}
    for pipeline in seconds:  # warm-up: page cache, lazy imports, allocator
        timed_pass(pipeline, paths, crop_px)
    for _ in range(repeats):
        # Interleaved, so slow drift in machine load hits both pipelines alike.
        for pipeline in seconds:
            elapsed_s, counts[pipeline] = timed_pass(pipeline, paths, crop_px)
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


def measure_both_sizes(paths: list[Path], repeats: int) -> tuple[dict[int, dict], float]:
    """`measure` at 224 and 128 px, and how many cores other processes kept busy meanwhile."""
    machine_cpu_s, own_cpu_s, start_s = *cpu_seconds(), time.perf_counter()
    results = {crop_px: measure(paths, crop_px, repeats) for crop_px in (224, 128)}
    # The load average lags by a minute; the CPU time others burnt during the timing is exact.
    others_cpu_s = (cpu_seconds()[0] - machine_cpu_s) - (time.process_time() - own_cpu_s)
    return results, others_cpu_s / (time.perf_counter() - start_s)


def is_drafted(path: Path, crop_px: int) -> bool:
    """Whether load_rgb decodes the file at reduced size (its rule: JPEG, shorter side >= 2x)."""
    with Image.open(path) as image:  # reads the header only
        return image.format == "JPEG" and min(image.size) >= 2 * crop_px


def grid_files(paths: list[Path], crop_px: int) -> list[tuple[Path, bool]]:
    """~GRID_IMAGES evenly spaced files, half of them draft-decoded ones where there are any."""
    # Draft-decoded files are where ours could differ from the baseline, so show some of them.
    drafted = [p for p in paths if is_drafted(p, crop_px)]
    plain = sorted(set(paths) - set(drafted))
    chosen = [(p, True) for p in drafted[::max(1, len(drafted) // (GRID_IMAGES // 2))]]
    chosen = chosen[:GRID_IMAGES // 2]
    wanted = GRID_IMAGES - len(chosen)
    return chosen + [(p, False) for p in plain[::max(1, len(plain) // wanted)][:wanted]]


def crop_pair(path: Path, data_cfg: DataConfig, seed: int) -> tuple[Image.Image, Image.Image]:
    """Baseline and ours train crops of one file drawn with the same random seed, as PIL images."""
    torch.manual_seed(seed)
    baseline = baseline_transform(data_cfg)(pil_loader(path))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    baseline_uint8 = (baseline * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    torch.manual_seed(seed)
    preset = train_transform(data_cfg)
    ours_uint8 = preset(load_rgb(path, min_side_px=preset.draft_px))
    return (T.functional.to_pil_image(baseline_uint8), T.functional.to_pil_image(ours_uint8))


def write_crop_grid(paths: list[Path], crop_px: int, out_path: Path) -> float | None:
    """PNG of baseline | ours crop pairs; returns mean |pixel diff| (0..255) of undrafted files."""
    chosen, cfg = grid_files(paths, crop_px), data_config(crop_px)
    gap_px, label_px, pairs_per_row = 8, 16, 2
    cell_w_px, cell_h_px = 2 * crop_px + 3 * gap_px, crop_px + label_px + gap_px
    rows = (len(chosen) + pairs_per_row - 1) // pairs_per_row
    grid = Image.new("RGB", (pairs_per_row * cell_w_px, rows * cell_h_px), "white")
    draw, diffs = ImageDraw.Draw(grid), []
    for index, (path, drafted) in enumerate(chosen):
        baseline, ours = crop_pair(path, cfg, seed=index)
        # Only files decoded at full size should match pixel for pixel: for drafted ones the same
        # random draws give the same crop scale but another offset (torch.randint over a smaller
        # range), so their difference says nothing about correctness.
        if not drafted:
            diffs.append(np.abs(np.asarray(baseline, np.int16) - np.asarray(ours, np.int16)).mean())
        x_px = (index % pairs_per_row) * cell_w_px + gap_px
        y_px = (index // pairs_per_row) * cell_h_px
        draw.text((x_px, y_px + 2), f"baseline  {path.name[:28]}", fill="black")
        draw.text((x_px + crop_px + gap_px, y_px + 2),
                  "ours (draft-decoded)" if drafted else "ours", fill="black")
        grid.paste(baseline, (x_px, y_px + label_px))
        grid.paste(ours, (x_px + crop_px + gap_px, y_px + label_px))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return round(float(np.mean(diffs)), 3) if diffs else None


def print_table(results: dict[int, dict], drafted: dict[int, float]) -> None:
    """The human-readable table: one row per pipeline and crop size."""
    print(f"{'pipeline':<10}{'px':>5}{'images':>8}{'seconds':>9}{'images/s/core':>15}"
          f"{'ratio':>7}{'spread_s':>10}  decoded with draft")
    for crop_px, by_pipeline in results.items():
        base_per_s = by_pipeline["baseline"]["images_per_s"]
        for name, row in by_pipeline.items():
            draft = f"{drafted[crop_px]:.0%} of files" if name == "ours" else "-"
            print(f"{name:<10}{crop_px:>5}{row['images']:>8}{row['seconds']:>9.2f}"
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


def main() -> None:
    """Parse options, time both pipelines at 224 and 128 px, write the grid, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 images, 3 timed passes")
    parser.add_argument("--images", help=f"folder of JPEGs (default {DEFAULT_IMAGES})")
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N files")
    parser.add_argument("--repeats", type=int, default=0, help="timed passes (default 3 / 5)")
    parser.add_argument("--ckpt-stall", action="store_true",
                        help="also fill ckpt_stall_s (saves a ResNet-50 checkpoint 3 times)")
    parser.add_argument("--ray-overhead", action="store_true",
                        help="also fill ray_overhead_ratio (benchmarks/ray_overhead.py)")
    parser.add_argument("--grid", default=str(REPO / "benchmarks" / "out" / "crops.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the figure is per core, like one loader worker
    paths, source = resolve_images(args)
    repeats = args.repeats or (3 if args.quick else 5)
    load_before = os.getloadavg()[0]
    print(f"{len(paths)} images from {source}; {repeats} timed passes after 1 warm-up; "
          f"batch {BATCH_SIZE}; 1 thread; {os.cpu_count()} cores; load avg {load_before:.2f}")
    results, other_cores = measure_both_sizes(paths, repeats)
    drafted = {crop_px: sum(is_drafted(p, crop_px) for p in paths) / len(paths)
               for crop_px in results}
    crop_diff = write_crop_grid(paths, 224, Path(args.grid))
    print_table(results, drafted)
    print(f"other processes used {other_cores:.2f} of {os.cpu_count()} cores during the timing")
    if any(r["baseline"]["images"] != r["ours"]["images"] for r in results.values()):
        print("WARNING: the pipelines yielded different image counts (undecodable files?)")
    print(f"crop grid: {args.grid} (full-size-decoded pairs: mean |diff| {crop_diff}/255)")
    stall_s = checkpoint_stall_s() if args.ckpt_stall else None
    ray_figures = {"ray_overhead_ratio": None}
    if args.ray_overhead:  # opt-in: minutes of 2-worker training and a local Ray
        from benchmarks.ray_overhead import run_benchmark
        ray_figures = run_benchmark(quick=args.quick)
    not_measured = [name for name, value in (("ray_overhead_ratio",
                                              ray_figures["ray_overhead_ratio"]),
                                             ("ckpt_stall_s", stall_s)) if value is None]
    speedup = {px: r["ours"]["images_per_s"] / r["baseline"]["images_per_s"]
               for px, r in results.items()}
    print(json.dumps({
        "pipeline_speedup": round(speedup[224], 3), "pipeline_speedup_128": round(speedup[128], 3),
        "baseline_images_per_s_224": round(results[224]["baseline"]["images_per_s"], 1),
        "ours_images_per_s_224": round(results[224]["ours"]["images_per_s"], 1),
        "baseline_images_per_s_128": round(results[128]["baseline"]["images_per_s"], 1),
        "ours_images_per_s_128": round(results[128]["ours"]["images_per_s"], 1),
        "images": len(paths), "repeats": repeats,
        "crop_mean_abs_diff_plain_224": crop_diff,
        "load_avg_before": round(load_before, 2), "other_processes_cores": round(other_cores, 2),
        **ray_figures,
        "ckpt_stall_s": None if stall_s is None else round(stall_s, 3),
        "not_measured": not_measured}))


if __name__ == "__main__":
    main()
