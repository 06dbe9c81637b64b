"""Image decoding and augmentation presets (torchvision-references style), uint8 end to end.

The CPU side decodes, crops, flips and applies the per-image regularizers (an AutoAugment-family
policy on the PIL crop, RandomErasing on the uint8 tensor): presets return a uint8 CHW tensor, and
`normalize` turns a uint8 batch into floats on the device, where it is nearly free. Decoding
dominates the CPU cost: training JPEGs are decoded by libjpeg-turbo with the crop drawn first
(`Preset.decode`, rn50.data.turbo_decode); everything else by Pillow, where `load_rgb` asks for a
reduced-size image
(`Image.draft`, DCT-domain downscaling by 1/2, 1/4 or 1/8) whenever the file is much larger than
the crop needs.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from rn50.config_sections import AutoAugment, choices
from rn50.data.turbo_decode import decode_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TENSOR_STEPS = (T.RandomHorizontalFlip, T.ColorJitter)  # work on PIL images and tensors alike
# torchvision's reference erases the normalised tensor with 0, i.e. the mean colour; on the uint8
# crop that colour is round(255 x mean), within half a grey level of it.
ERASE_VALUE_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, CMYK, RGBA, I;16, ...) as 3-channel RGB; alpha is dropped."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids Pillow's palette-transparency warning
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit greyscale PNGs
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("RGB")


def load_rgb(source: str | os.PathLike | bytes, min_side_px: int = 0) -> Image.Image:
    """Decode an image file or its bytes to a fully loaded RGB PIL image.

    With `min_side_px` > 0 a JPEG is decoded at the largest power-of-two reduction (at most 1/8)
    that keeps both sides >= `min_side_px`, so the crop that follows sees the same field of view at
    a resolution still at least the output size. `draft` must run before the pixels are read, which
    is why it lives here and not in the transform. Raises OSError/ValueError etc. on corrupt data.
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview))
                       else source)
    if min_side_px > 0 and image.format == "JPEG" and min(image.size) >= 2 * min_side_px:
        image.draft("RGB", (min_side_px, min_side_px))
    image.load()
    return to_rgb(image)


class Preset:
    """A PIL -> uint8 CHW tensor transform; `draft_px` tells loaders how small they may decode.

    `decode(source)` decodes and transforms in one go: a preset that starts with
    RandomResizedCrop followed only by flip / colour jitter decodes JPEGs with libjpeg-turbo,
    crop first (rn50.data.turbo_decode); everything else (a PIL policy, a non-JPEG) goes through
    Pillow and `__call__`. `tensor_steps` (RandomErasing) run last on the uint8 tensor either
    way."""

    def __init__(self, steps: list[Callable], draft_px: int, tensor_steps: tuple = ()):
        self.transform = T.Compose([*steps, T.PILToTensor(), *tensor_steps])
        self.draft_px = draft_px
        fast = steps and isinstance(steps[0], T.RandomResizedCrop) and \
            all(isinstance(s, _TENSOR_STEPS) for s in steps[1:])
        self.crop_first = steps[0] if fast else None
        self.after_crop = [*steps[1:], *tensor_steps]  # flip, jitter, erasing: tensors too

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def decode(self, source: str | os.PathLike | bytes,
               draft_px: int | None = None) -> torch.Tensor:
        """The transformed uint8 CHW tensor of an image file or its bytes (raises if corrupt)."""
        if self.crop_first is not None:
            data = source if isinstance(source, (bytes, bytearray, memoryview)) else \
                Path(source).read_bytes()
            out = decode_crop(bytes(data), self.crop_first)
            if out is not None:
                for step in self.after_crop:  # the same draws, in the same order, as __call__
                    out = step(out)
                return out
            source = data
        return self(load_rgb(source, self.draft_px if draft_px is None else draft_px))

    def __repr__(self) -> str:
        return f"Preset(draft_px={self.draft_px}, {self.transform!r})"

    def set_crop_px(self, crop_px: int) -> None:
        """Change the RandomResizedCrop output side (progressive resizing), nothing else."""
        # `draft_px` stays at the largest side: decoding a little larger than the crop is exact,
        # smaller would not be.
        for step in self.transform.transforms:
            if isinstance(step, T.RandomResizedCrop):
                step.size = (crop_px, crop_px)


def train_crop_px_at(data_cfg, epoch: int) -> int:
    """The train crop side for `epoch` under progressive resizing (FFCV's rule)."""
    if not data_cfg.progressive_min_px or epoch >= data_cfg.progressive_end_epoch:
        return data_cfg.train_crop_px
    if epoch <= data_cfg.progressive_start_epoch:
        return data_cfg.progressive_min_px
    progress = (epoch - data_cfg.progressive_start_epoch) / \
        (data_cfg.progressive_end_epoch - data_cfg.progressive_start_epoch)
    side_px = data_cfg.progressive_min_px + progress * (data_cfg.train_crop_px -
                                                        data_cfg.progressive_min_px)
    # Multiples of 32 keep every stage's feature maps whole and cuDNN's kernel choices few.
    rounded_px = int(round(side_px / 32)) * 32
    return min(max(rounded_px, data_cfg.progressive_min_px), data_cfg.train_crop_px)


def train_transform(data_cfg) -> Preset:
    """RandomResizedCrop(train_crop_px, scale=(min_crop_scale, 1)) [+ flip] [+ jitter] -> uint8.

    Through `Preset.decode`, JPEGs take the crop-first libjpeg-turbo path (crop box drawn over
    the original image, decoded at the DCT scale the box allows); others, and direct calls on a
    PIL image, are decoded by Pillow (draft: shorter side >= train_crop_px) and cropped after.
    """
    steps: list[Callable] = [T.RandomResizedCrop(data_cfg.train_crop_px,
                                                 scale=(data_cfg.min_crop_scale, 1.0),
                                                 interpolation=T.InterpolationMode.BILINEAR,
                                                 antialias=True)]
    if data_cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if data_cfg.color_jitter > 0:
        cj = data_cfg.color_jitter
        steps.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    policy = auto_augment_policy(data_cfg.auto_augment)
    if policy is not None:
        steps.append(policy)  # on the PIL crop, as torchvision's references (PIL backend) do
    return Preset(steps, draft_px=data_cfg.train_crop_px,
                  tensor_steps=tuple(erasing_steps(data_cfg.random_erasing_prob)))


_BILINEAR = v2.InterpolationMode.BILINEAR
AUTO_AUGMENT_POLICIES: dict[str, Callable[[], v2.Transform] | None] = {
    "none": None,
    "trivialaugment_wide": lambda: v2.TrivialAugmentWide(interpolation=_BILINEAR),
    "randaugment": lambda: v2.RandAugment(interpolation=_BILINEAR),
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, _BILINEAR)}
"""Each `data.auto_augment` choice (`AutoAugment` in rn50.config_sections) and its policy."""


def auto_augment_policy(name: AutoAugment) -> v2.Transform | None:
    """torchvision's v2 policy for `data.auto_augment`, set up as the classification references."""
    if name not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"unknown data.auto_augment {name!r}; must be one of "
                         f"{list(choices(AutoAugment))}")
    make = AUTO_AUGMENT_POLICIES[name]
    return make() if make is not None else None


def erasing_steps(prob: float) -> list[v2.Transform]:
    """[v2.RandomErasing(prob) filling with the mean colour] for a uint8 CHW image; [] at 0."""
    return [v2.RandomErasing(p=prob, value=list(ERASE_VALUE_UINT8))] if prob > 0 else []


@functools.lru_cache(maxsize=8)
def tensor_policy(auto_augment: str, random_erasing_prob: float) -> v2.Compose | None:
    """The per-image policies for a uint8 CHW tensor on any device (the device-decode path)."""
    policy = auto_augment_policy(auto_augment)
    steps = ([policy] if policy is not None else []) + erasing_steps(random_erasing_prob)
    return v2.Compose(steps) if steps else None


def val_transform(data_cfg) -> Preset:
    """Resize(shorter side = val_resize_px) + CenterCrop(val_crop_px) -> uint8."""
    steps: list[Callable] = [T.Resize(data_cfg.val_resize_px,
                                      interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                             T.CenterCrop(data_cfg.val_crop_px)]
    return Preset(steps, draft_px=data_cfg.val_resize_px)


@functools.lru_cache(maxsize=16)
def _normalize_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) as float32 [3, 1, 1] tensors on `device`, built once per device.

    Built per call they were a copy from pageable host memory, which on a GPU blocks the host
    until the stream has caught up: a sync in every micro-batch. Never written to."""
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    return (1.0 / (255.0 * std)).to(device), (-mean / std).to(device)


def normalize(batch_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] in 0..255 -> `dtype` (x/255 - mean) / std, on the input's device.

    A float copy plus one in-place multiply and add (about 3x faster on CPU than a broadcasting
    addcmul); the memory format (e.g. channels_last) is preserved. A contiguous CPU batch goes
    through numpy instead, whose cast-while-multiplying is one pass: 11 vs 22 ms for 64 x 224 px.
    """
    if batch_uint8.dim() < 3 or batch_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got shape {tuple(batch_uint8.shape)}")
    device = batch_uint8.device
    scale, shift = _normalize_constants(device)
    if device.type == "cpu" and batch_uint8.is_contiguous():
        # numpy's allocator, too: a fresh torch.empty of this size measured 8 ms slower.
        out_np = np.empty(batch_uint8.shape, dtype=np.float32)
        np.multiply(batch_uint8.numpy(), scale.numpy(), out=out_np, dtype=np.float32)
        np.add(out_np, shift.numpy(), out=out_np)
        out = torch.from_numpy(out_np)
    else:
        out = batch_uint8.to(torch.float32).mul_(scale).add_(shift)
    return out if dtype == torch.float32 else out.to(dtype)
