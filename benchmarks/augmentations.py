"""Augmentation benchmark (issue 16): (a) a PNG grid of one batch under each augmentation, rendered
from the uint8 tensors the loader yields (and, for MixUp/CutMix, the normalised batch the model
gets, mapped back to pixels): what the model sees; (b) the per-image CPU cost of each per-image
policy on one core, every policy timed in the same run, alternating, against the plain preset.

    python -m benchmarks.augmentations --max-images 200     # the figures in benchmarks/results/
    python -m benchmarks.augmentations --images DIR --max-images 4 --repeats 1 \\
        --out /tmp/a.json --grid /tmp/a.png                  # smoke check

Per image, as a loader worker does it: Pillow decode (draft) + the train preset, inside the
loaders' per-(seed, epoch, index) seeding, torch.set_num_threads(1), one process, files read into
memory first. `transform_only` times the preset alone on images decoded beforehand. Times are the
process's CPU seconds (time.process_time), so images/s is per busy core and time lost to other
processes on a shared machine does not count (their cache and memory traffic still can). Every
row of the grid uses the same per-image seeds, so the crop and flip match down a column.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from benchmarks.images import DEFAULT_IMAGES, find_jpegs, generate_jpegs
from benchmarks.pipeline import cpu_seconds
from benchmarks.results import write_result
from rn50.config import DataConfig
from rn50.core.mixing import BatchMixer
from rn50.data.loaders import SeededAugmentation
from rn50.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalize,
                                  train_transform)

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results"
# Per-image settings. RandomErasing at p=1 shows (and costs) an erasure on every image; "all" is
# imagenet_tv2's per-image part, TrivialAugmentWide + RandomErasing 0.1.
PER_IMAGE = {"none": {}, "trivialaugment_wide": {"auto_augment": "trivialaugment_wide"},
             "randaugment": {"auto_augment": "randaugment"},
             "autoaugment": {"auto_augment": "autoaugment"},
             "random_erasing": {"random_erasing_prob": 1.0},
             "all": {"auto_augment": "trivialaugment_wide", "random_erasing_prob": 0.1}}
# Batch rows: (per-image setting, mixup_alpha, cutmix_alpha); "all" is imagenet_tv2 as a whole.
GRID_ROWS = {**{name: (name, 0.0, 0.0) for name in PER_IMAGE if name != "all"},
             "mixup": ("none", 0.2, 0.0), "cutmix": ("none", 0.0, 1.0), "all": ("all", 0.2, 1.0)}
ROW_TITLES = {"none": "none (crop + flip)", "trivialaugment_wide": "TrivialAugmentWide",
              "randaugment": "RandAugment (2 ops, m9)", "autoaugment": "AutoAugment (ImageNet)",
              "random_erasing": "RandomErasing (p=1)", "mixup": "MixUp (alpha 0.2)",
              "cutmix": "CutMix (alpha 1.0)",
              "all": "all: imagenet_tv2 (TA wide, RE 0.1, MixUp 0.2 | CutMix 1.0)"}


class _Images(Dataset):
    """In-memory JPEG bytes (or decoded images) through a train preset; label = index."""

    def __init__(self, sources: list, preset):
        self.sources, self.preset = sources, preset

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        image = source.copy() if isinstance(source, Image.Image) else \
            load_rgb(source, self.preset.draft_px)
        return self.preset(image), index


def _preset(name: str, crop_px: int):
    return train_transform(DataConfig(train_crop_px=crop_px, **PER_IMAGE[name]))


def augmented_batch(sources: list, name: str, crop_px: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, 3, crop, crop]: each image under setting `name`, seeded as the loader seeds it."""
    seeded = SeededAugmentation(_Images(sources, _preset(name, crop_px)), seed, epoch=0)
    return torch.stack([seeded[i][0] for i in range(len(sources))])


def _to_uint8(normalised: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (normalised * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def grid_rows(sources: list, names: list[str], crop_px: int) -> dict[str, tuple]:
    """Row -> (uint8 batch the model sees, caption per tile)."""
    rows, labels = {}, torch.arange(len(sources))
    for row, (per_image, mixup, cutmix) in GRID_ROWS.items():
        batch = augmented_batch(sources, per_image, crop_px)
        captions = [names[i] for i in range(len(sources))]
        if mixup or cutmix:
            mixer = BatchMixer(len(sources), mixup, cutmix, seed=0)
            mixed, targets = mixer(normalize(batch), labels, step=0, micro_batch=0)
            batch = _to_uint8(mixed)
            captions = [" + ".join(f"{target[c]:.2f} {names[c]}" for c in
                                   target.topk(2).indices.tolist() if target[c] > 0.005)
                        for target in targets]
        rows[row] = (batch, captions)
    return rows


def write_grid(rows: dict[str, tuple], crop_px: int, out_path: Path, exact: bool = False) -> None:
    """One row per augmentation, one column per image, a caption under each tile; saved with a
    dithered 256-colour palette (~40% of the bytes; no visible banding) unless `exact`."""
    columns = len(next(iter(rows.values()))[0])
    gap_px, title_px, caption_px = 6, 16, 14
    cell_h_px = title_px + crop_px + caption_px + gap_px
    grid = Image.new("RGB", (gap_px + columns * (crop_px + gap_px), len(rows) * cell_h_px), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, (batch, captions)) in enumerate(rows.items()):
        top_px = r * cell_h_px
        draw.text((gap_px, top_px + 2), ROW_TITLES[row], fill="black")
        for c, (tile, caption) in enumerate(zip(batch, captions)):
            left_px = gap_px + c * (crop_px + gap_px)
            grid.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (left_px, top_px + title_px))
            draw.text((left_px, top_px + title_px + crop_px + 1), caption[:crop_px // 6],
                      fill="dimgray")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not exact:  # quantize() alone does not dither: smooth areas would band like a posterize
        palette = grid.quantize(256, method=Image.Quantize.FASTOCTREE)
        grid = grid.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    grid.save(out_path, optimize=True)


def _timed_pass(dataset: Dataset) -> float:
    start = time.process_time()  # CPU time: robust to other processes taking the core
    for index in range(len(dataset)):
        dataset[index]
    return time.process_time() - start


def measure(data: list[bytes], crop_px: int, repeats: int) -> tuple[dict, float]:
    """Per setting: median images/s (decode + preset, and preset alone) over `repeats` passes
    after one warm-up, settings alternating within each pass; and the cores others used."""
    decoded = [load_rgb(d, crop_px) for d in data]
    datasets = {(name, kind): SeededAugmentation(_Images(sources, _preset(name, crop_px)), 0, 0)
                for name in PER_IMAGE for kind, sources in (("full", data), ("transform", decoded))}
    seconds = {key: [] for key in datasets}
    machine_s, own_s, start_s = *cpu_seconds(), time.perf_counter()
    for repeat in range(repeats + 1):
        keys = list(datasets)
        for key in keys[repeat % len(keys):] + keys[:repeat % len(keys)]:  # rotate the order
            elapsed = _timed_pass(datasets[key])
            if repeat:
                seconds[key].append(elapsed)
    others_s = (cpu_seconds()[0] - machine_s) - (time.process_time() - own_s)
    rate = {key: len(data) / statistics.median(times) for key, times in seconds.items()}
    figures = {name: {"images_per_s": round(rate[name, "full"], 1),
                      "ratio_vs_none": round(rate[name, "full"] / rate["none", "full"], 3),
                      "transform_only_images_per_s": round(rate[name, "transform"], 1),
                      "transform_only_ratio_vs_none": round(
                          rate[name, "transform"] / rate["none", "transform"], 3)}
               for name in PER_IMAGE}
    return figures, others_s / (time.perf_counter() - start_s)


def mixing_ms(crop_px: int, batch_size: int = 64, repeats: int = 20) -> dict[str, float]:
    """CPU milliseconds per normalised batch for MixUp and CutMix (on a GPU they run there)."""
    images = torch.randn(batch_size, 3, crop_px, crop_px)
    labels = torch.randint(0, 1000, (batch_size,))
    out = {}
    for name, alphas in (("mixup", (0.2, 0.0)), ("cutmix", (0.0, 1.0))):
        mixer = BatchMixer(1000, *alphas, seed=0)
        start = time.perf_counter()
        for step in range(repeats):
            mixer(images, labels, step, 0)
        out[name] = round(1000 * (time.perf_counter() - start) / repeats, 2)
    return out


def resolve_images(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The files to use and where they came from (generated ones if the folder has none)."""
    directory = Path(args.images)
    paths = find_jpegs(directory) if directory.is_dir() else []
    if not paths:
        directory = Path(args.out).parent / "synthetic_jpegs"
        directory.mkdir(parents=True, exist_ok=True)
        paths = generate_jpegs(directory, args.max_images or 16)
        return paths, f"{len(paths)} generated ImageNet-like JPEGs (seed 0)"
    return paths[:args.max_images or None], str(directory.resolve())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of JPEGs")
    parser.add_argument("--max-images", type=int, default=200, help="0 = all")
    parser.add_argument("--crop-px", type=int, default=176, help="train crop (imagenet_tv2: 176)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting")
    parser.add_argument("--grid-images", type=int, default=6)
    parser.add_argument("--exact-colours", action="store_true",
                        help="save the grid in full RGB (~2.5x larger) instead of 256 colours")
    parser.add_argument("--out", default=str(RESULTS / "augmentations.json"))
    parser.add_argument("--grid", default=str(RESULTS / "augmentations.png"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Write the grid, time the policies, print a table and write the JSON figures."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # one core: the figures are per loader worker
    paths, source = resolve_images(args)
    step = max(1, len(paths) // args.grid_images)
    shown = paths[::step][:args.grid_images]
    names = [p.stem.split("_", 1)[-1][:14] for p in shown]
    write_grid(grid_rows([p.read_bytes() for p in shown], names, args.crop_px), args.crop_px,
               Path(args.grid), args.exact_colours)
    figures, other_cores = measure([p.read_bytes() for p in paths], args.crop_px, args.repeats)
    print(f"{len(paths)} images from {source}, {args.crop_px} px, median of {args.repeats} passes, "
          f"1 thread, CPU time; other processes used {other_cores:.2f} of {os.cpu_count()} cores")
    print(f"{'setting':<22}{'images/s':>10}{'ratio':>8}{'transform only':>16}{'ratio':>8}")
    for name, row in figures.items():
        print(f"{name:<22}{row['images_per_s']:>10}{row['ratio_vs_none']:>8}"
              f"{row['transform_only_images_per_s']:>16}{row['transform_only_ratio_vs_none']:>8}")
    mixing = mixing_ms(args.crop_px)
    flat = {f"{name}_{key}": value for name, row in figures.items() for key, value in row.items()}
    flat.update({f"{name}_ms_per_batch_64_cpu": value for name, value in mixing.items()})
    context = {"images": len(paths), "source": source, "crop_px": args.crop_px,
               "repeats": args.repeats, "threads": 1,
               "timing": "process CPU seconds per pass, median of the passes",
               "other_processes_cores": round(other_cores, 2), "settings": PER_IMAGE,
               "per_image": figures, "grid": Path(args.grid).name}
    write_result("augmentations", flat, ["benchmarks/augmentations.py", *(argv or sys.argv[1:])],
                 path=args.out, context=context)
    result = {"figures": flat, **context}
    print(f"grid: {args.grid}\nfigures: {args.out}")
    return result


if __name__ == "__main__":
    main()
