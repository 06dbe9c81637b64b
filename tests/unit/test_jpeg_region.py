"""rn50_jpeg_region (rn50/data/_jpeg_region.c), the partial JPEG decoder behind the train preset:
pixel for pixel what a whole-image libjpeg-turbo decode gives in the region, at every DCT scale
and chroma layout, baseline and progressive, rows below the region never read, damaged data an
error."""
import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from rn50.data import turbo_decode
from tests.region_decoder import require_region_decoder

rn50_jpeg_region = turbo_decode.rn50_jpeg_region  # None where it was not built: see below


@pytest.fixture(autouse=True)
def _built():
    """Every test here needs the extension: skipped without it, failed where CI is set."""
    require_region_decoder()

WIDTH, HEIGHT = 301, 203  # not multiples of any iMCU: partial blocks on the right and bottom


def _jpeg(mode: str = "RGB", subsampling: int = 2, width: int = WIDTH, height: int = HEIGHT,
          quality: int = 90, progressive: bool = False) -> bytes:
    """A photo-like JPEG: smooth colour plus fine noise, so every block has detail to decode."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=quality,
                                               subsampling=subsampling, progressive=progressive)
    return out.getvalue()


def _whole(data: bytes, factor: int) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, "RGB", fastdct=True,
                                  min_width=turbo_decode.scaled_px(WIDTH, factor),
                                  min_height=turbo_decode.scaled_px(HEIGHT, factor))


BOXES = [(0, 0, 1, 1), (0, 0, HEIGHT, WIDTH), (0, 16, 40, 32), (17, 33, 50, 61),
         (HEIGHT - 30, WIDTH - 45, 30, 45), (100, 0, 1, WIDTH), (5, 290, 198, 11)]


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["444", "422", "420"])
@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_the_region_is_the_whole_decode_there_at_every_scale(subsampling, factor, progressive):
    data = _jpeg(subsampling=subsampling, progressive=progressive)
    whole = torch.from_numpy(_whole(data, factor))
    for top, left, box_h, box_w in BOXES:
        box = turbo_decode.scaled_box(top, left, box_h, box_w, HEIGHT, WIDTH, factor)
        region = turbo_decode.decode_region_hwc(data, factor, box, HEIGHT, WIDTH)
        y0, x0, h, w = box
        assert torch.equal(region, whole[y0:y0 + h, x0:x0 + w]), (factor, box)


def test_grayscale_jpegs_come_out_rgb():
    data = _jpeg("L")
    box = (10, 20, 30, 40)
    region = turbo_decode.decode_region_hwc(data, 1, box, HEIGHT, WIDTH)
    assert region.shape == (30, 40, 3) and torch.equal(region[..., 0], region[..., 2])
    assert torch.equal(region, torch.from_numpy(_whole(data, 1))[10:40, 20:60])


def test_rows_below_the_region_are_never_decoded():
    # A file cut off in its lower part: a region above the cut decodes, because nothing below the
    # region's rows (and the next iMCU row, the upsampling's context) is ever read.
    data = _jpeg(height=1000, width=200, quality=95)
    cut = data[:len(data) // 2]
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(cut, "RGB")
    out = np.empty(100 * 200 * 3, dtype=np.uint8)
    rn50_jpeg_region.decode_region(cut, 1, 50, 20, 100, 60, out)
    whole = simplejpeg.decode_jpeg(data, "RGB", fastdct=True)
    assert np.array_equal(out[:100 * 60 * 3].reshape(100, 60, 3), whole[50:150, 20:80])
    with pytest.raises(ValueError, match="JPEG region decode"):
        rn50_jpeg_region.decode_region(cut, 1, 900, 20, 100, 60, out)


@pytest.mark.parametrize("data, args, message", [
    (b"not a jpeg at all", (1, 0, 0, 1, 1), "JPEG region decode"),
    ("truncated", (1, 0, 0, HEIGHT, WIDTH), "JPEG region decode"),
    ("ok", (1, HEIGHT - 5, 0, 10, 10), "outside"),
    ("ok", (1, 0, WIDTH - 5, 10, 10), "outside"),
    ("ok", (3, 0, 0, 10, 10), "unsupported scale"),
    ("ok", (1, 0, 0, 10, 10), "too small"),
])
def test_bad_input_is_a_value_error_never_a_crash(data, args, message):
    if data == "truncated":
        data = _jpeg()[:600]
    elif data == "ok":
        data = _jpeg()
    # 10 rows need 10 x WIDTH x 3 bytes of room, not only the region's 10 x 10 x 3.
    small = np.empty(10 * 10 * 3 if message == "too small" else HEIGHT * WIDTH * 3, np.uint8)
    with pytest.raises(ValueError, match=message):
        rn50_jpeg_region.decode_region(data, *args, small)
