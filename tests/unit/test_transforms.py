"""Presets return uint8 CHW tensors for any input mode; draft decoding; device normalization."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from rn50.config import DataConfig
from rn50.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalize, to_rgb,
                             train_crop_px_at, train_transform, val_transform)


def _cfg(**overrides) -> DataConfig:
    values = dict(train_crop_px=48, val_resize_px=56, val_crop_px=48, color_jitter=0.4)
    values.update(overrides)
    return DataConfig(**values)


def _image(mode: str, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_presets_give_uint8_rgb_for_every_mode(mode):
    image = _image("L").convert("I;16") if mode == "I;16" else _image(mode)
    cfg = _cfg()
    train_out = train_transform(cfg)(image)
    val_out = val_transform(cfg)(image)
    assert train_out.dtype == val_out.dtype == torch.uint8
    assert train_out.shape == val_out.shape == (3, 48, 48)
    assert to_rgb(image).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGB"])
def test_load_rgb_converts_jpeg_modes_and_bytes(tmp_path, mode):
    path = tmp_path / "x.jpg"
    _image(mode).save(path, quality=90)
    from_path, from_bytes = load_rgb(path), load_rgb(path.read_bytes())
    assert from_path.mode == from_bytes.mode == "RGB" and from_path.size == (90, 70)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))


def test_png_rgba_is_converted(tmp_path):
    path = tmp_path / "x.png"
    _image("RGBA").save(path)
    assert load_rgb(path, min_side_px=10).mode == "RGB"  # draft ignores non-JPEG files


def test_large_jpeg_draft_keeps_crop_and_semantics():
    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    big = Image.fromarray(smooth).resize((1600, 1200), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    drafted = load_rgb(data, min_side_px=128)
    assert min(drafted.size) >= 128 and drafted.size[0] <= 400  # decoded at 1/4 or 1/8 scale
    assert load_rgb(data, min_side_px=1000).size == (1600, 1200)  # too little to gain: no draft
    full = load_rgb(data)
    cfg = _cfg(train_crop_px=128, val_resize_px=146, val_crop_px=128)
    assert train_transform(cfg)(drafted).shape == train_transform(cfg)(full).shape == (3, 128, 128)
    val = val_transform(cfg)
    a, b = val(drafted).float(), val(full).float()
    assert a.shape == (3, 128, 128) and (a - b).abs().mean() < 6  # same view of the scene
    assert train_transform(cfg).draft_px == 128 and val.draft_px == 146


def test_train_flip_and_jitter_options():
    no_aug = train_transform(_cfg(hflip=False, color_jitter=0.0, min_crop_scale=0.5))
    names = [type(t).__name__ for t in no_aug.transform.transforms]
    assert names == ["RandomResizedCrop", "PILToTensor"]
    assert no_aug.transform.transforms[0].scale == (0.5, 1.0)
    names = [type(t).__name__ for t in train_transform(_cfg()).transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "PILToTensor"]


def test_normalize_matches_reference_and_keeps_layout():
    batch = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    torch.testing.assert_close(out, (batch.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    constant = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(normalize(constant)[0, :, 0, 0],
                               (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    channels_last = batch.contiguous(memory_format=torch.channels_last)
    assert normalize(channels_last).is_contiguous(memory_format=torch.channels_last)
    # A contiguous CPU batch goes through numpy, others through torch: the same values.
    torch.testing.assert_close(normalize(channels_last), out, rtol=0, atol=0)
    torch.testing.assert_close(normalize(batch[:, :, ::2]), out[:, :, ::2], rtol=0, atol=0)
    assert normalize(batch[0]).shape == (3, 9, 7)
    assert normalize(batch, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 4, 3, 3, dtype=torch.uint8))
    if torch.cuda.is_available():
        torch.testing.assert_close(normalize(batch.cuda()).cpu(), out)


def _ffcv_resolution(epoch, min_res, max_res, start_ramp, end_ramp):
    """FFCV's get_resolution, restated with numpy as the reference."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    resolution = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0]
    return int(np.round(resolution / 32)) * 32


@pytest.mark.parametrize("epochs,start,end", [(16, 11, 13), (24, 17, 20), (88, 65, 76)])
def test_progressive_resizing_follows_ffcv(epochs, start, end):
    cfg = _cfg(train_crop_px=192, progressive_min_px=160, progressive_start_epoch=start,
               progressive_end_epoch=end)
    ours = [train_crop_px_at(cfg, epoch) for epoch in range(epochs)]
    assert ours == [_ffcv_resolution(e, 160, 192, start, end) for e in range(epochs)]
    assert ours[0] == 160 and ours[-1] == 192
    assert [train_crop_px_at(_cfg(), epoch) for epoch in range(3)] == [48] * 3  # off by default


def test_crop_side_changes_on_the_live_dataset_through_a_subset():
    from torch.utils.data import Subset

    from rn50.data.loaders import set_train_crop_px

    class Images:
        transform = train_transform(_cfg(train_crop_px=48))

        def __getitem__(self, index):
            return self.transform(_image("RGB"))

    dataset = Subset(Images(), [0])
    assert dataset[0].shape == (3, 48, 48)
    set_train_crop_px(dataset, 32)
    assert dataset[0].shape == (3, 32, 32)
    assert dataset.dataset.transform.draft_px == 48  # decode size stays safe for the largest crop
