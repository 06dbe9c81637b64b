"""The crop-first libjpeg-turbo path: same draws and crop boxes as RandomResizedCrop on the decoded
image, DCT-scaled decoding where the crop allows it, Pillow for everything it does not take.
Every test runs on both decoders: the region decoder (rn50_jpeg_region, built at install) and
the whole-image one (simplejpeg) used where that extension could not be built."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from rn50.config import DataConfig
from rn50.data.transforms import load_rgb, train_transform
from rn50.data import turbo_decode
from rn50.data.turbo_decode import dct_factor, decode_crop
from tests.region_decoder import require_region_decoder

CFG = DataConfig(train_crop_px=64, min_crop_scale=0.08, hflip=True, color_jitter=0.0)


@pytest.fixture(autouse=True, params=["region", "whole"])
def decoder(request, monkeypatch):
    """Each test once per decoder: the region extension, then simplejpeg's whole-image decode."""
    if request.param == "region":
        require_region_decoder()  # skipped where it was not built, failed where CI is set
    if request.param == "whole":
        monkeypatch.setattr(turbo_decode, "rn50_jpeg_region", None)
    return request.param


def _photo(width: int, height: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth picture (photo-like: JPEG keeps it) in the given mode and format."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    out = io.BytesIO()
    coarse.resize((width, height), Image.BICUBIC).convert(mode).save(out, fmt, quality=95)
    return out.getvalue()


@pytest.mark.parametrize("seed", range(6))
def test_the_same_draws_give_the_same_crop_as_pillow_then_crop(seed):
    data, preset = _photo(300, 200), train_transform(CFG)
    torch.manual_seed(seed)
    reference = preset(load_rgb(data)).float()
    after_reference = torch.rand(1)
    torch.manual_seed(seed)
    ours = preset.decode(data).float()
    assert torch.rand(1) == after_reference  # as many draws, so every later draw matches too
    assert ours.shape == reference.shape == (3, 64, 64)
    # Same box; the fast IDCT differs by ~1/255, and a crop >= 2x the output is decoded at 1/2
    # scale (a coarser grid, box edges rounded to it): a few /255 on a 64 px crop.
    assert (ours - reference).abs().mean() < 4


def test_small_crops_of_large_images_decode_at_a_reduced_dct_scale(monkeypatch):
    assert [dct_factor(side, 224) for side in (100, 224, 447, 448, 900, 1792, 5000)] == \
        [1, 1, 1, 2, 4, 8, 8]
    decoded = []  # (factor, (rows, columns) decoded) of each decode
    original = turbo_decode.decode_region_hwc

    def recording(data, factor, *args):
        pixels = original(data, factor, *args)
        decoded.append((factor, pixels.shape[:2]))
        return pixels
    monkeypatch.setattr(turbo_decode, "decode_region_hwc", recording)
    data, preset = _photo(1600, 1200), train_transform(CFG)
    for seed in range(4):
        torch.manual_seed(seed)
        ours = preset.decode(data).float()
        torch.manual_seed(seed)
        reference = preset(load_rgb(data)).float()
        assert (ours - reference).abs().mean() < 4
    assert len(decoded) == 4
    # A 64 px crop of 1,200 rows never needs full scale; the region decoded is the crop's.
    assert all(factor > 1 and height < 1200 // factor for factor, (height, _) in decoded)


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("RGB", "PNG")])
def test_what_libjpeg_turbo_does_not_take_goes_to_pillow_with_its_draws(mode, fmt):
    data, preset = _photo(120, 90, mode, fmt), train_transform(CFG)
    state = torch.get_rng_state()
    assert decode_crop(data, preset.crop_first) is None
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    torch.manual_seed(1)
    ours = preset.decode(data)
    torch.manual_seed(1)
    assert torch.equal(ours, preset(load_rgb(data)))  # exactly the Pillow path


def test_damaged_jpegs_put_the_draws_back_and_grayscale_becomes_rgb():
    preset = train_transform(CFG)
    damaged = _photo(120, 90)[:400]
    state = torch.get_rng_state()
    assert decode_crop(damaged, preset.crop_first) is None
    assert torch.equal(torch.get_rng_state(), state)
    gray = preset.decode(_photo(120, 90, "L"))
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1])


def test_presets_without_a_leading_crop_keep_pillow():
    val = train_transform(CFG), None
    from rn50.data.transforms import val_transform
    assert val[0].crop_first is not None and val_transform(CFG).crop_first is None
    data = _photo(120, 90)
    assert torch.equal(val_transform(CFG).decode(data), val_transform(CFG)(load_rgb(data, 32)))
