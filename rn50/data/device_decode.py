"""Training JPEGs decoded on the training device (`data.decode_on_device`): nvJPEG on a GPU.

Loader workers then only read bytes and draw each image's augmentation (the crop box, the flip,
the jitter factors) from the same per-(seed, epoch, index) generator and in the same order as the
CPU preset, so data order, augmentation and exact resume are unchanged; the training process
decodes the batch with `torchvision.io.decode_jpeg(device=...)` and applies the drawn crop, flip
and jitter there, then the per-image policies (`data.auto_augment`, `data.random_erasing_prob`) on
the device tensor, their draws replayed from a seed drawn in the worker (so they differ from the
CPU preset's draws for the same image, but are as deterministic). What nvJPEG cannot take (PNG,
CMYK or other non-RGB/grey JPEGs) is decoded and augmented on the CPU by the ordinary preset and
joins the batch as a ready uint8 tensor. On a CPU-only worker the same path runs with
torchvision's CPU decoder (correct, not faster).
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from rn50.data.transforms import load_rgb, tensor_policy, train_transform

log = logging.getLogger(__name__)
_JITTER_FUNCTIONS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


@dataclass
class EncodedImage:
    """One training image still encoded, with the augmentation drawn for it."""
    data: bytes  # the JPEG file; bytes, not a tensor: 256 tensors a batch would each cost the
                 # loader's inter-process queue a shared-memory file descriptor
    box: tuple[int, int, int, int]  # top, left, height, width in full-size pixels
    crop_px: int
    flip: bool
    jitter: tuple | None          # torchvision ColorJitter.get_params output, or None
    policy: tuple[str, float] = ("none", 0.0)  # data.auto_augment, data.random_erasing_prob
    policy_seed: int = 0          # the policies' draws are replayed from it at decode time

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """Crop, resize, flip, jitter and apply the policies to a decoded uint8 CHW image."""
        image = F.resized_crop(image, *self.box, [self.crop_px, self.crop_px],
                               interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        if self.flip:
            image = F.horizontal_flip(image)
        if self.jitter is not None:
            order, *factors = self.jitter
            for function_index in order.tolist():
                if factors[function_index] is not None:
                    image = _JITTER_FUNCTIONS[function_index](image, factors[function_index])
        policy = tensor_policy(*self.policy)
        if policy is None:
            return image
        # The v2 policies draw on the CPU generator (and only apply on the image's device); seeding
        # it here makes the draws the worker's, whatever process or order decodes the batch.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.policy_seed)
            return policy(image)


class DeviceDecodePreset:
    """The train preset's augmentation, drawn on the CPU for decoding on the device later."""

    decodes_on_device = True

    def __init__(self, data_cfg):
        self.cpu_preset = train_transform(data_cfg)  # for files nvJPEG cannot take
        self.draft_px = 0  # the device decodes at full size
        self.crop_px, self.hflip = data_cfg.train_crop_px, data_cfg.hflip
        self.scale, self.ratio = (data_cfg.min_crop_scale, 1.0), (3 / 4, 4 / 3)
        jitter = data_cfg.color_jitter
        self.jitter = T.ColorJitter(jitter, jitter, jitter) if jitter > 0 else None
        self.policy = (data_cfg.auto_augment, data_cfg.random_erasing_prob)

    def set_crop_px(self, crop_px: int) -> None:
        """Change the output side (progressive resizing)."""
        self.crop_px = crop_px
        self.cpu_preset.set_crop_px(crop_px)

    def plan(self, source: str | os.PathLike | bytes) -> EncodedImage | torch.Tensor:
        """The bytes and drawn augmentation of a baseline RGB/grey JPEG, else the CPU result."""
        data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        header = Image.open(io.BytesIO(data))  # reads the header only: no pixels decoded
        if header.format != "JPEG" or header.mode not in ("RGB", "L"):
            return self.cpu_preset(load_rgb(data, self.cpu_preset.draft_px))
        # The draws, in the CPU preset's order: RandomResizedCrop, flip, ColorJitter.
        box = T.RandomResizedCrop.get_params(header, self.scale, self.ratio)
        flip = self.hflip and bool(torch.rand(1) < 0.5)  # no draw without flips, as on the CPU
        jitter = None
        if self.jitter is not None:
            jitter = T.ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                              self.jitter.saturation, self.jitter.hue)
        # One more draw only when a policy is on, so the plain path keeps the CPU preset's draws.
        policy_seed = int(torch.randint(1 << 62, ())) \
            if tensor_policy(*self.policy) is not None else 0
        return EncodedImage(bytes(data), box, self.crop_px, flip, jitter, self.policy, policy_seed)


class DeferredBatch:
    """A collated batch of `EncodedImage`s and ready uint8 tensors, decoded by `decode`."""

    def __init__(self, items: list[EncodedImage | torch.Tensor]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, labels: torch.Tensor, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(uint8 [B,3,H,W] on `device`, their labels, how many failed to decode: dropped)."""
        encoded = [torch.frombuffer(bytearray(item.data), dtype=torch.uint8)
                   for item in self.items if isinstance(item, EncodedImage)]
        decoded = iter(_decode_all(encoded, device))
        images, keep = [], []
        for item in self.items:
            image = next(decoded) if isinstance(item, EncodedImage) else \
                item.to(device, non_blocking=device.type == "cuda")
            if image is not None and isinstance(item, EncodedImage):
                image = item.augment(image)
            keep.append(image is not None)
            if image is not None:
                images.append(image)
        kept = torch.tensor(keep, dtype=torch.bool)
        if not images:
            return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=device), labels[kept], \
                len(keep)
        return torch.stack(images), labels[kept], len(keep) - len(images)


def _decode_all(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a list of JPEGs in one call; on failure one by one, `None` for the bad ones."""
    if not encoded:
        return []
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one truncated or corrupt file fails the whole batched call
        pass
    results = []
    for index, data in enumerate(encoded):
        try:
            results.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            log.warning("skipping undecodable image (batch position %d): %s", index, err)
            results.append(None)
    return results
