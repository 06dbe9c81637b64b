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
