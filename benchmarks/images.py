"""Benchmark inputs: the real ImageNet sample when it is beside the repository, else seeded
synthetic JPEGs of ImageNet-like size and content."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "imagenet-sample"
JPEG_SUFFIXES = (".jpg", ".jpeg")


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


class CycledFiles:
    """A map-style data set of `length` samples cycling over JPEG `paths` (label = index % 10),
    decoded through `transform` as the image-folder data set decodes them: an ImageNet-length
    epoch (sample streams drawn over all of it) from a handful of files."""

    def __init__(self, paths: list[Path], length: int, transform):
        self.paths, self.length, self.transform = [str(p) for p in paths], length, transform
        self.draft_px = getattr(transform, "draft_px", 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        from rn50.data.datasets import decode_sample
        path = self.paths[index % len(self.paths)]
        return decode_sample(path, index % 10, self.transform, self.draft_px, path)
