"""Map-style image datasets: class folders (incl. the ILSVRC layouts) and HF-style parquet shards.

Both return `(uint8 CHW tensor, label)` per index, or `None` for an image that cannot be decoded
(`collate_skip_corrupt` in rn50.data.loaders drops those and counts them), so one bad file never
stops a run.
"""
from __future__ import annotations

import bisect
import csv
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from rn50.io import storage
from rn50.data.common import (IMAGE_EXTENSIONS, VAL_SOLUTION_CSV, DataError,
                              find_parquet_shards, hf_label_names, image_bytes)
from rn50.data.transforms import load_rgb

log = logging.getLogger(__name__)

def decode_sample(source, label: int, transform: Callable | None, draft_px: int, what: str):
    """(uint8 image, label) of one encoded sample through `transform`; None when corrupt."""
    try:
        if getattr(transform, "decodes_on_device", False):  # rn50.data.device_decode: bytes + plan
            return transform.plan(source), label
        if hasattr(transform, "decode"):  # a Preset: decodes as it likes (crop first for JPEGs)
            return transform.decode(source, draft_px), label
        image = load_rgb(source, draft_px)
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        log.warning("skipping undecodable image %s: %s", what, err)
        return None
    return (transform(image) if transform is not None else pil_to_tensor(image)), label


def _subdirs(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(e.name for e in os.scandir(directory)
                  if e.is_dir() and not e.name.startswith("."))


def _images_in(directory: Path) -> list[str]:
    return sorted(e.path for e in os.scandir(directory)
                  if e.is_file() and not e.name.startswith(".")  # macOS ._* sidecars
                  and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _find_val_solution(root: Path, split_dir: Path) -> Path | None:
    """LOC_val_solution.csv next to the images, in root or up to three levels above (Kaggle)."""
    for directory in (split_dir, root, *list(root.resolve().parents)[:3]):
        if (directory / VAL_SOLUTION_CSV).is_file():
            return directory / VAL_SOLUTION_CSV
    return None


def _read_val_solution(csv_path: Path) -> dict[str, str]:
    """ImageId -> wnid (first token of PredictionString) from the Kaggle ImageNet CSV."""
    with open(csv_path, newline="") as handle:
        rows = csv.DictReader(handle)
        if not rows.fieldnames or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
            raise DataError(f"{csv_path} must have the columns ImageId,PredictionString")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}


class ImageFolderDataset(Dataset):
    """`root/<split>/<class>/*.{jpg,jpeg,png}` (any case), classes sorted by folder name.

    Also the ILSVRC layouts: train/ with synset folders, and val/ either with synset folders or
    flat `val/*.JPEG` labelled by a Kaggle `LOC_val_solution.csv` (looked for in val/, root and up
    to three parents). Class indices come from `classes` if given, else from `root/train` when it
    exists (so train and val always agree), else from this split.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 classes: list[str] | None = None, draft_px: int | None = None):
        self.root, self.split = Path(root), split
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(f"'{split_dir}' does not exist: an image-folder data set needs "
                            f"{self.root}/train/<class>/*.jpg and {self.root}/val/<class>/*.jpg")
        self.transform = transform
        self.draft_px = getattr(transform, "draft_px", 0) if draft_px is None else draft_px
        folders = _subdirs(split_dir)
        solution = None
        if not folders:
            csv_path = _find_val_solution(self.root, split_dir)
            if csv_path is None:
                raise DataError(f"'{split_dir}' has no class folders and no {VAL_SOLUTION_CSV} was "
                                f"found next to it, in {self.root} or above; add one or sort the "
                                "images into <class>/ folders")
            solution = _read_val_solution(csv_path)
        if classes is None:
            classes = _subdirs(self.root / "train") if split != "train" else []
            classes = classes or folders or sorted(set(solution.values()))
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        if folders:
            unknown = [f for f in folders if f not in self.class_to_idx]
            if unknown:
                raise DataError(f"'{split_dir}' has class folders absent from the training "
                                f"classes: {unknown[:5]}")
            for name in folders:
                label = self.class_to_idx[name]
                self.samples += [(path, label) for path in _images_in(split_dir / name)]
        else:
            for path in _images_in(split_dir):
                wnid = solution.get(Path(path).stem)
                if wnid is None or wnid not in self.class_to_idx:
                    raise DataError(f"'{path}' has no known label in {VAL_SOLUTION_CSV} "
                                    f"(got {wnid!r})")
                self.samples.append((path, self.class_to_idx[wnid]))
        if not self.samples:
            raise DataError(f"no .jpg/.jpeg/.png images under '{split_dir}'")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return decode_sample(path, label, self.transform, self.draft_px, path)


def _filesystem_and_path(root: str, filesystem: pafs.FileSystem | None):
    if filesystem is not None:
        return filesystem, root.split("://", 1)[-1].rstrip("/")
    try:  # the one resolver: S3 with the project's timeouts, retries and messages
        return storage.filesystem_and_path(root)
    except storage.StorageError as err:
        raise DataError(f"cannot open '{root}': {err}") from err


class ParquetDataset(Dataset):
    """Random access into HF `imagenet-1k`-style shards: `image` {bytes, path} + `label` int.

    `root` is a local directory or a URI pyarrow understands (s3://bucket/prefix), or a path on
    the given `filesystem`. Init reads only the parquet footers (row-group sizes); row groups are
    read on demand and the last `cache_row_groups` kept, so sequential-ish access within a shard is
    cheap. File handles are reopened in each DataLoader worker process.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 filesystem: pafs.FileSystem | None = None, num_classes: int | None = None,
                 draft_px: int | None = None, cache_row_groups: int = 4):
        self.fs, base = _filesystem_and_path(str(root), filesystem)
        self.files = find_parquet_shards(self.fs, base, split)
        self.transform, self.cache_row_groups = transform, cache_row_groups
        self.draft_px = getattr(transform, "draft_px", 0) if draft_px is None else draft_px
        self._groups: list[tuple[int, int]] = []  # (file index, row group), global order
        self._starts: list[int] = []              # first global row of each entry in _groups
        total, names = 0, None
        for file_index, path in enumerate(self.files):
            with self.fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                metadata = parquet.metadata
                names = names or hf_label_names(parquet.schema_arrow.metadata)
            for group in range(metadata.num_row_groups):
                self._groups.append((file_index, group))
                self._starts.append(total)
                total += metadata.row_group(group).num_rows
        self._len = total
        if names is None:
            num_classes = num_classes or 1 + max(
                (max(pq.read_table(p, columns=["label"], filesystem=self.fs)["label"].to_pylist(),
                     default=-1) for p in self.files), default=-1)
            names = [str(i) for i in range(num_classes)]
        self.classes = list(names)
        self._reset()

    def _reset(self) -> None:
        self._pid, self._handles, self._cache = os.getpid(), {}, OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_handles={}, _cache=OrderedDict(), _pid=None)
        return state

    def __len__(self) -> int:
        return self._len

    def row_group_ranges(self) -> list[range]:
        """The global row indices of each row group, in storage order (what a streaming sampler
        deals out: a row group is read once, front to back)."""
        ends = [*self._starts[1:], self._len]
        return [range(start, end) for start, end in zip(self._starts, ends)]

    def _row_group(self, entry: int) -> tuple[list, list]:
        if self._pid != os.getpid():  # forked into a DataLoader worker: never share handles
            self._reset()
        if entry in self._cache:
            self._cache.move_to_end(entry)
            return self._cache[entry]
        file_index, group = self._groups[entry]
        if file_index not in self._handles:
            stream = self.fs.open_input_file(self.files[file_index])
            self._handles[file_index] = pq.ParquetFile(stream)
        table = self._handles[file_index].read_row_group(group, columns=["image", "label"])
        self._cache[entry] = (image_bytes(table), table.column("label").to_pylist())
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return self._cache[entry]

    def __getitem__(self, index: int):
        if not 0 <= index < self._len:
            raise IndexError(index)
        entry = bisect.bisect_right(self._starts, index) - 1
        images, labels = self._row_group(entry)
        row = index - self._starts[entry]
        what = f"{self.files[self._groups[entry][0]]} row {row}"
        if images[row] is None:
            return None
        return decode_sample(images[row], int(labels[row]), self.transform, self.draft_px, what)
