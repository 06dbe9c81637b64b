"""The small data sets, prepared once and cached: scikit-learn's digits written as a JPEG
ImageFolder, Imagenette downloaded, MD5-checked and safely extracted.

Each preparation takes an advisory lock on its cache directory (one process prepares, the others
wait) and finishes by writing a `.complete` marker, so an interrupted run leaves nothing that a
later one would mistake for a finished data set.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from rn50.data.datasets import IMAGE_EXTENSIONS, DataError

MARKER = ".complete"
DIGITS_CLASSES = [str(d) for d in range(10)]
_BASE = "https://s3.amazonaws.com/fast-ai-imageclas"
IMAGENETTE_URLS = {160: f"{_BASE}/imagenette2-160.tgz", 320: f"{_BASE}/imagenette2-320.tgz",
                   0: f"{_BASE}/imagenette2.tgz"}
# Published MD5s of the archives, as pinned by torchvision.datasets.Imagenette._ARCHIVES.
IMAGENETTE_MD5 = {160: "e793b78cc4c9e9a4ccc0c1155377a412", 320: "3df6f0d01a2c9592104656642f5e78a3",
                  0: "fe2fc210e6bb7c5664d602c3cd71e612"}
IMAGENETTE_SYNSETS = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
    "n03888257": "parachute"}


@contextlib.contextmanager
def _locked(directory: Path):
    """Exclusive advisory lock on `directory/.lock`: one process prepares, the others wait."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_digits(root: Path, image_px: int = 32, seed: int = 0) -> Path:
    """Write scikit-learn's 1,797 8x8 digits as `root/{train,val}/<digit>/NNNN.jpg`, once.

    Stratified 80/20 split (1,437 / 360) fixed by `seed`; 16 grey levels scaled to 0..255,
    bilinear upscale to `image_px`, RGB JPEG quality 95. `root/.complete` is written last; without
    it (or for another image_px) the tree is rebuilt.
    """
    root = Path(root).expanduser()
    expected = {"images": 1797, "image_px": image_px, "seed": seed}
    marker = root / MARKER
    if _read_marker(marker) == expected:
        return root  # before importing scikit-learn: ~1 s of every worker's start
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    with _locked(root):
        if _read_marker(marker) == expected:
            return root
        marker.unlink(missing_ok=True)
        for split in ("train", "val"):
            shutil.rmtree(root / split, ignore_errors=True)
        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train_idx, val_idx = train_test_split(np.arange(len(pixels)), test_size=0.2,
                                              stratify=digits.target, random_state=seed)
        for split, indices in (("train", train_idx), ("val", val_idx)):
            for i in sorted(indices.tolist()):
                folder = root / split / DIGITS_CLASSES[digits.target[i]]
                folder.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray(pixels[i], "L").resize((image_px, image_px),
                                                               Image.Resampling.BILINEAR)
                image.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
        marker.write_text(json.dumps(expected))
    return root


def download(url: str, dest: Path, expected_md5: str | None = None,
             timeout_s: float = 60.0) -> str:
    """Fetch `url` to `dest` via `dest.part` + rename; check length and MD5; return the SHA-256."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    md5, sha256, received = hashlib.md5(), hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            while chunk := response.read(1 << 20):
                out.write(chunk)
                md5.update(chunk)
                sha256.update(chunk)
                received += len(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({err}); download it manually to {dest} "
                        "(it is verified and extracted on the next run) or set data.root to an "
                        "extracted copy with data.dataset=imagefolder") from err
    problem = None
    if length is not None and received != int(length):
        problem = f"download truncated: got {received} of {length} bytes"
    elif expected_md5 and md5.hexdigest() != expected_md5:
        problem = f"MD5 {md5.hexdigest()} does not match the published {expected_md5}"
    if problem:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: {problem}; run again, or download it manually to {dest}")
    os.replace(part, dest)
    return sha256.hexdigest()


def _file_hashes(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def _safe_members(tar: tarfile.TarFile):
    """Yield regular files and folders; refuse absolute paths, `..`, links and devices."""
    for member in tar:
        parts = PurePosixPath(member.name).parts
        drive = ":" in (parts[0] if parts else "")  # C:... on Windows
        if member.name.startswith(("/", "\\")) or ".." in parts or drive:
            raise DataError(f"unsafe path in archive: {member.name!r}")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"archive member {member.name!r} is a link or device; refusing it")
        yield member


def _extract(archive: Path, dest: Path) -> int:
    """Extract to a scratch folder, check the Imagenette layout, move it to `dest`; return the
    number of files."""
    scratch = dest.with_name(f".{dest.name}.extracting")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(scratch, members=_safe_members(tar), **kwargs)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DataError(f"{archive} is not a readable archive ({err}); delete it and run "
                            "again to download a fresh copy") from err
        candidates = [scratch, *(p for p in scratch.iterdir() if p.is_dir())]
        top = next((p for p in candidates if (p / "train").is_dir() and (p / "val").is_dir()), None)
        if top is None:
            raise DataError(f"{archive} has no train/ and val/ folders")
        for split in ("train", "val"):
            missing = sorted(set(IMAGENETTE_SYNSETS) - {p.name for p in (top / split).iterdir()})
            if missing:
                raise DataError(f"{archive}: {split}/ lacks the synsets {missing}")
        count = sum(1 for p in top.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(top, dest)
        return count
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_imagenette(cache_dir: Path, size_px: int, url: str | None = None,
                       expected_md5: str | None = None, timeout_s: float = 60.0) -> Path:
    """Download (once), verify, safely extract and return `cache_dir/imagenette2[-SIZE]`.

    With the default URL the archive must match fastai's published MD5; with a custom `url` only
    `expected_md5` (if any) is checked. Either way the archive must be a readable tar with train/
    and val/ holding all ten synsets; its SHA-256 is recorded in `<archive>.sha256` and the marker.
    """
    if url is None:
        if size_px not in IMAGENETTE_URLS:
            raise DataError(f"no Imagenette archive for size {size_px}; use 160, 320 or 0 (full)")
        url, expected_md5 = IMAGENETTE_URLS[size_px], expected_md5 or IMAGENETTE_MD5[size_px]
    cache_dir = Path(cache_dir).expanduser()
    archive = cache_dir / url.rsplit("/", 1)[-1]
    dest = cache_dir / archive.name.split(".")[0]
    if (dest / MARKER).is_file():
        return dest
    with _locked(cache_dir):
        if (dest / MARKER).is_file():
            return dest
        if archive.is_file():  # left by an earlier run or put there by hand: check it first
            md5, sha256 = _file_hashes(archive)
            if expected_md5 and md5 != expected_md5:
                raise DataError(f"{archive} has MD5 {md5}, not the published {expected_md5}; "
                                "delete it and run again")
            downloaded = False
        else:
            sha256, downloaded = download(url, archive, expected_md5, timeout_s), True
        try:
            count = _extract(archive, dest)
        except DataError:
            if downloaded:  # a bad copy we fetched ourselves: the next run fetches a fresh one
                archive.unlink(missing_ok=True)
            raise
        Path(f"{archive}.sha256").write_text(f"{sha256}  {archive.name}\n")
        (dest / MARKER).write_text(json.dumps({"images": count, "sha256": sha256, "url": url}))
    return dest
