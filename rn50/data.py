"""Data sets and loaders: cached preparation (digits, Imagenette), sharded deterministic loading.

Public API: `build_datasets(data_cfg)` -> (train, val, class names); `build_loader(...)` -> a
DataLoader yielding `(uint8 images [B,3,H,W], int64 labels [B], num_skipped)`; `prepare_digits`,
`prepare_imagenette`, `download`; the datasets and `DataError` (defined in rn50.datasets).

Determinism: a training loader's order is a DistributedSampler permutation of (seed, epoch), and
each sample's augmentation is drawn from torch's CPU generator re-seeded from (seed, epoch,
dataset index) around that one `__getitem__` (the caller's RNG state is restored afterwards). So
the images a rank sees for a given (seed, epoch, rank) are identical whatever `loader_workers` is,
and a resumed run reproduces a run that never stopped, with nothing for the caller to seed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import random
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from rn50.datasets import (IMAGE_EXTENSIONS, DataError, ImageFolderDataset,  # noqa: F401
                           ParquetDataset)
from rn50.transforms import train_transform, val_transform

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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    root = Path(root).expanduser()
    expected = {"images": 1797, "image_px": image_px, "seed": seed}
    marker = root / MARKER
    if _read_marker(marker) == expected:
        return root
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
        if member.name.startswith(("/", "\\")) or ".." in parts or ":" in (parts[0] if parts else ""):
            raise DataError(f"unsafe path in archive: {member.name!r}")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"archive member {member.name!r} is a link or device; refusing it")
        yield member


def _extract(archive: Path, dest: Path) -> int:
    """Extract to a scratch folder, check the Imagenette layout, move it to `dest`; return #files."""
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


def _fixed_subset(dataset: Dataset, limit: int) -> Dataset:
    """The first `limit` samples of a fixed (seed 0) shuffle, kept in index order; 0 keeps all."""
    if limit <= 0 or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, sorted(order[:limit].tolist()))


def build_datasets(data_cfg) -> tuple[Dataset, Dataset, list[str]]:
    """Train and val datasets (uint8 tensors out) and the class names for `data_cfg`.

    `max_val_samples` also takes a fixed shuffled subset (a plain prefix of a class-sorted folder
    would be a single class). Digits are written at 32 px regardless of the crop (the source is
    8 px), so one cache serves every recipe.
    """
    train_tf, val_tf, kind = train_transform(data_cfg), val_transform(data_cfg), data_cfg.dataset
    root = Path(os.path.expanduser(data_cfg.root))
    if kind == "parquet":
        train = ParquetDataset(data_cfg.root, "train", train_tf, num_classes=data_cfg.num_classes)
        val = ParquetDataset(data_cfg.root, "val", val_tf, num_classes=data_cfg.num_classes)
    elif kind in ("digits", "imagefolder", "imagenette"):
        if kind == "digits":
            root = prepare_digits(root)
        elif kind == "imagenette":
            root = prepare_imagenette(root, data_cfg.imagenette_size_px)
        train = ImageFolderDataset(root, "train", train_tf)
        val = ImageFolderDataset(root, "val", val_tf, classes=train.classes)
    else:
        raise DataError(f"unknown data.dataset {kind!r}")
    names = [IMAGENETTE_SYNSETS.get(c, c) for c in train.classes]
    if len(names) != data_cfg.num_classes:
        raise DataError(f"the data set has {len(names)} classes but data.num_classes is "
                        f"{data_cfg.num_classes}; set data.num_classes={len(names)}")
    return (_fixed_subset(train, data_cfg.max_train_samples),
            _fixed_subset(val, data_cfg.max_val_samples), names)


def set_train_crop_px(train_set: Dataset, crop_px: int) -> None:
    """Point the train dataset's RandomResizedCrop at `crop_px` (progressive resizing)."""
    while isinstance(train_set, Subset):
        train_set = train_set.dataset
    train_set.transform.set_crop_px(crop_px)


def collate_skip_corrupt(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the decodable samples; `None` (corrupt) ones are dropped and counted."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), \
            skipped
    images = torch.stack([image for image, _ in good])
    return images, torch.tensor([label for _, label in good], dtype=torch.int64), skipped


def _mix(*values: int) -> int:
    seed = 0x2545F491
    for value in values:
        seed = (seed * 0x9E3779B97F4A7C15 + int(value) + 1) % (1 << 63)
    return seed


class _SeededAugmentation(Dataset):
    """Draw each sample's augmentation from torch's CPU generator seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        generator = torch.default_generator  # CPU only: CUDA RNG state is never touched
        state = generator.get_state()
        generator.manual_seed(_mix(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ShardedEvalSampler(DistributedSampler):
    """Rank r takes indices r, r+W, ...: disjoint, covering, no padding duplicates (exact eval)."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode per core: intra-op threads would only oversubscribe
    random.seed(torch.initial_seed() % (1 << 32))
    np.random.seed(torch.initial_seed() % (1 << 32))


class _SkipSampler(Sampler):
    """A sampler's order without its first `skip` indices: resuming mid-epoch never decodes the
    images already trained on, and sees the rest in exactly the original order."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class RowGroupSampler(Sampler):
    """Shuffled reading of parquet shards without random access (what streaming from S3 needs).

    Row groups are dealt to ranks in a seeded order per epoch, and rows are shuffled within each
    group, so every rank reads each of its row groups once, front to back, and never touches
    another rank's. Ranks are cut to the same length (DDP needs equal step counts). The shards
    written by prepare_imagenet are globally shuffled, so this keeps the randomness of a full
    shuffle at the cost of one group's worth of correlation inside a batch.
    """

    def __init__(self, dataset: ParquetDataset, rank: int, world_size: int, seed: int, epoch: int):
        ends = [*dataset._starts[1:], len(dataset)]
        order = torch.randperm(len(ends), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        per_rank = [order[r::world_size].tolist() for r in range(world_size)]
        self.length = min(sum(ends[g] - dataset._starts[g] for g in groups) for groups in per_rank)
        self.indices = []
        for group in per_rank[rank]:
            rows = torch.randperm(ends[group] - dataset._starts[group],
                                  generator=torch.Generator().manual_seed(_mix(seed, epoch, group)))
            self.indices += (rows + dataset._starts[group]).tolist()
        self.indices = self.indices[:self.length]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.length


def build_loader(dataset: Dataset, batch_size_per_worker: int, rank: int, world_size: int,
                 seed: int, epoch: int, train: bool, loader_workers: int = 0,
                 skip_batches: int = 0) -> DataLoader:
    """This rank's loader for one epoch: train shuffles by (seed, epoch) and drops the ragged tail
    (DistributedSampler, drop_last), starting after `skip_batches` batches; val is an unshuffled,
    unpadded 1/world_size shard."""
    if train and isinstance(dataset, ParquetDataset):
        sampler = RowGroupSampler(dataset, rank, world_size, seed, epoch)
    elif train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    if train:
        if skip_batches:
            sampler = _SkipSampler(sampler, skip_batches * batch_size_per_worker)
        dataset = _SeededAugmentation(dataset, seed, epoch)
    else:
        sampler = ShardedEvalSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size_per_worker, sampler=sampler,
                      num_workers=loader_workers, collate_fn=collate_skip_corrupt, drop_last=train,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      worker_init_fn=_worker_init if loader_workers > 0 else None,
                      generator=torch.Generator().manual_seed(_mix(seed, epoch, rank)))
