"""Small trained-or-not models and checkpoints for the inference, export and evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rn50.io.checkpoints import save_checkpoint
from rn50.config import Config, load_config
from rn50.core.model import EMA, build_model


def digits_config(root: Path, *overrides: str) -> Config:
    """The demo recipe on digits under `root`, validation cut to 96 images."""
    return load_config("demo", [f"data.root={root}", "data.max_val_samples=96", *overrides])


def write_checkpoint(directory: Path, config: Config, seed: int = 0, ema: bool = False,
                     extra: dict | None = None) -> Path:
    """A checkpoint of a randomly initialised model (and, if asked, a perturbed EMA copy)."""
    torch.manual_seed(seed)
    model = build_model(config.model, config.data.num_classes)
    with torch.no_grad():  # non-trivial BN statistics, so train/eval mode mix-ups would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    average = None
    if ema:
        average = EMA(model, 0.9).state_dict()
        average["fc.bias"] += 1.0  # differs from the live weights in a way a test can see
    state = {"model": model.state_dict(), "ema": average, "epoch": 0, "config": config.to_dict(),
             **(extra or {})}
    return save_checkpoint(directory, state, {"epoch": 0, "val_top1": 0.0})


def random_image(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB",
                 seed: int = 0) -> Path:
    """A noise image saved to `path` (format from the suffix) in the given Pillow mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path
