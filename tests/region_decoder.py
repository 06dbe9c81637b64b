"""The region decoder (rn50_jpeg_region) for its tests: skipped where it was not built, never
silently in CI."""
from __future__ import annotations

import os

import pytest

from rn50.data import turbo_decode


def require_region_decoder():
    """The rn50_jpeg_region module; skip without it, but fail under `.ci/run`
    (RN50_REQUIRE_REGION_DECODER=1) or wherever CI is set, where a skip would hide untested
    code."""
    if turbo_decode.rn50_jpeg_region is not None:
        return turbo_decode.rn50_jpeg_region
    message = ("rn50_jpeg_region was not built here (no C compiler or libjpeg's headers at "
               "install): apt-get install gcc libjpeg-dev, then "
               "pip install -c constraints.txt -e .")
    if os.environ.get("RN50_REQUIRE_REGION_DECODER") == "1" or os.environ.get("CI"):
        pytest.fail(message + " — the region decoder's tests must run here", pytrace=False)
    pytest.skip(message)
