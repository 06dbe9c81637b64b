"""Training JPEG decode at libjpeg-turbo speed: the crop is drawn first, then decoded, cropped and
resized with as little work as the crop allows (the CPU path of `train_transform`).

1. The JPEG header gives the image size (simplejpeg, microseconds); RandomResizedCrop's own
   `get_params` draws the crop box over the original image's coordinates, from torch's global
   generator, exactly as it does on a decoded image: same draws, same box distribution.
2. libjpeg-turbo decodes at the smallest DCT scale of 1/2, 1/4 or 1/8 that keeps the crop at
   least the output size (power-of-two scales have libjpeg-turbo's SIMD kernels; the other n/8
   scales measured slower than a full decode), with its fast integer IDCT (FFCV decodes with the
   same flag; the difference to the accurate IDCT is under 1/255 on average, see the tests).
   Only the crop's region is decoded (rn50/data/_jpeg_region.c: rows above it entropy-decoded
   only, rows below it not at all in a sequential JPEG, columns outside it not transformed; DALI's
   `image_random_crop` does the same), pixel for pixel what a whole-image decode gives there,
   1.3x faster on the 1,000 ImageNet sample files. Where that extension was not built (no
   libjpeg headers at install), simplejpeg decodes the whole image at the same scale instead.
3. The crop is a view of the decoded pixels, resized to the output by torch's antialiased uint8
   bilinear kernel in one step, in their own channels-last layout: no PIL image.

`decode_crop` returns None for what it does not handle (not a JPEG: PNG bytes in a .JPEG file;
CMYK/YCCK JPEGs; data libjpeg-turbo reports as damaged; no simplejpeg installed), having put
torch's generator back, so the caller's Pillow path draws and decodes exactly as it would have on
its own.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import interpolate
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F2

try:
    import rn50_jpeg_region  # built from _jpeg_region.c at install, where libjpeg's headers are
except ImportError:
    rn50_jpeg_region = None
try:  # a dependency of the package; optional only so that a bare torch machine (a lent GPU
    import simplejpeg  # running benchmarks/gpu_throughput.py from a checkout) can import this
except ImportError:
    simplejpeg = None

_COLORSPACES = ("YCbCr", "Gray")  # what libjpeg-turbo turns into RGB itself
_AA_MODES = (T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC)


def dct_factor(crop_side_px: int, out_px: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps a crop of `crop_side_px` >= `out_px` after scaling."""
    factor = 1
    while factor < 8 and crop_side_px // (2 * factor) >= out_px:
        factor *= 2
    return factor


def scaled_px(side_px: int, factor: int) -> int:
    """An image side of `side_px` decoded at 1/`factor`: libjpeg rounds it up."""
    return -(-side_px // factor)


def scaled_box(top: int, left: int, box_h: int, box_w: int, height: int, width: int,
               factor: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box of the original image in its 1/`factor` decode;
    at least one pixel."""
    scaled_h, scaled_w = scaled_px(height, factor), scaled_px(width, factor)
    y0, x0 = round(top * scaled_h / height), round(left * scaled_w / width)
    y1 = max(y0 + 1, round((top + box_h) * scaled_h / height))
    x1 = max(x0 + 1, round((left + box_w) * scaled_w / width))
    return y0, x0, y1 - y0, x1 - x0


def decode_region_hwc(data: bytes, factor: int, box: tuple[int, int, int, int],
                      height: int, width: int) -> torch.Tensor:
    """The `box` (top, left, h, w) of the JPEG decoded at 1/`factor` scale, uint8 HWC RGB
    (raises ValueError on damaged data): only that region where the extension is built."""
    top, left, box_h, box_w = box
    if rn50_jpeg_region is None:
        pixels = simplejpeg.decode_jpeg(data, "RGB", fastdct=True,
                                        min_width=scaled_px(width, factor),
                                        min_height=scaled_px(height, factor))
        return torch.from_numpy(pixels)[top:top + box_h, left:left + box_w]
    out = np.empty(box_h * scaled_px(width, factor) * 3, dtype=np.uint8)  # the decode's room
    rn50_jpeg_region.decode_region(data, factor, top, left, box_h, box_w, out)
    return torch.from_numpy(out[:box_h * box_w * 3]).view(box_h, box_w, 3)


def decode_crop(data: bytes, crop: T.RandomResizedCrop) -> torch.Tensor | None:
    """`crop(decoded image)` as a uint8 CHW tensor, from JPEG bytes; None: use Pillow instead
    (also whenever simplejpeg is not installed)."""
    if simplejpeg is None:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # not a JPEG (or no readable header): Pillow decides
        return None
    if colorspace not in _COLORSPACES:
        return None
    state = torch.get_rng_state()
    # get_params reads only the size: a zero-stride view stands in for the image.
    top, left, box_h, box_w = crop.get_params(torch.empty(1, 1, 1).expand(3, height, width),
                                              crop.scale, crop.ratio)
    out_h, out_w = crop.size
    factor = dct_factor(min(box_h, box_w), max(out_h, out_w))
    box = scaled_box(top, left, box_h, box_w, height, width, factor)
    try:
        pixels = decode_region_hwc(data, factor, box, height, width)
    except ValueError:  # damaged data: let Pillow decide, with the draws it would have made
        torch.set_rng_state(state)
        return None
    # NCHW view of the HWC pixels, batch stride included: interpolate picks its channels-last
    # kernel from the strides (`permute(2, 0, 1)[None]` measured 0.19 vs 0.12 ms a crop).
    region = pixels[None].permute(0, 3, 1, 2)
    if crop.interpolation not in _AA_MODES:
        return F2.resize(region[0], [out_h, out_w], interpolation=crop.interpolation)
    # The decoded pixels are HWC: torch's uint8 antialiased kernel is fastest on that
    # (channels_last) layout, 0.39 vs 0.62 ms a 224 px crop through F2.resize here.
    region = region.contiguous(memory_format=torch.channels_last)
    return interpolate(region, size=(out_h, out_w), mode=crop.interpolation.value,
                       antialias=True, align_corners=False)[0]


def decoder_name() -> str:
    """Which decoder the train preset's JPEG path uses on this machine (benchmarks record it)."""
    if simplejpeg is None:
        return "pillow (simplejpeg not installed)"
    return "libjpeg-turbo region decode" if rn50_jpeg_region is not None else \
        "simplejpeg whole-image decode"
