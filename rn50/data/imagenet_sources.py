"""Where ImageNet's JPEGs are: ILSVRC class folders, the ILSVRC tars, or HF parquet shards.

Every image becomes a `Record`: a byte range of one file plus its label. For a folder that range
is the whole file; for the tars it is the member's data inside the outer tar, so
`ILSVRC2012_img_train.tar` (1,000 class tars inside one tar) is never unpacked: each image is read
with one ranged read, which works the same on a local disk and on S3. For Hugging Face
`ILSVRC/imagenet-1k`-style parquet shards a record is a row of a row group instead. No Ray here.
"""
from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rn50.data.datasets import (IMAGE_EXTENSIONS, VAL_SOLUTION_CSV, DataError, ImageFolderDataset,
                           find_parquet_shards, hf_label_names, image_bytes)
from rn50.io.storage import resolve_storage

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


@dataclass(frozen=True)
class Record:
    """One image: `size` bytes at `offset` in `source` (size -1: the whole file), or, when
    `row` >= 0, row `row` of row group `offset` of the parquet file `source`."""
    source: str
    offset: int
    size: int
    label: int
    name: str
    row: int = -1


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or s3:// URI, S3 configured as rn50.io.storage does."""
    fs, path = resolve_storage(uri)
    return fs or pafs.LocalFileSystem(), path


def read_record(fs: pafs.FileSystem, record: Record, handles: dict) -> bytes:
    """The image bytes of `record`; `handles` caches open files (and row groups) between calls."""
    if record.row >= 0:
        return _parquet_row_group(fs, record, handles)[record.row]
    if record.size < 0:
        with fs.open_input_stream(record.source) as stream:
            return stream.read()
    if record.source not in handles:
        handles[record.source] = fs.open_input_file(record.source)
    return handles[record.source].read_at(record.size, record.offset)


def _parquet_row_group(fs: pafs.FileSystem, record: Record, handles: dict) -> list[bytes]:
    # A shard's rows come from a few row groups (see plan_shards): each is read once, whole.
    key = (record.source, record.offset)
    if key not in handles:
        if record.source not in handles:
            handles[record.source] = pq.ParquetFile(fs.open_input_file(record.source))
        table = handles[record.source].read_row_group(record.offset, columns=["image"])
        handles[key] = image_bytes(table)
    return handles[key]


def list_parquet(root: str, split: str, classes: list[str] | None = None):
    """Records of HF-style parquet shards (`data/train-00000-of-00294.parquet`, `image` {bytes,
    path} + `label`); class names from the HF metadata, else the given or numbered ones."""
    fs, base = filesystem(root)
    records, names = [], None
    for path in find_parquet_shards(fs, base.rstrip("/"), split):
        parquet = pq.ParquetFile(fs.open_input_file(path))
        names = names or hf_label_names(parquet.schema_arrow.metadata)
        has_path = "path" in getattr(parquet.schema_arrow.field("image").type, "names", [])
        table = parquet.read(columns=["label"] + (["image.path"] if has_path else []))
        labels = table.column("label").to_pylist()
        paths = table.column("image").combine_chunks().field("path").to_pylist() if has_path \
            else [None] * len(labels)
        index = 0
        for group in range(parquet.metadata.num_row_groups):
            for row in range(parquet.metadata.row_group(group).num_rows):
                name = paths[index] or f"{PurePosixPath(path).stem}/{group}/{row}"
                records.append(Record(path, group, 0, labels[index], name, row))
                index += 1
    if any(r.label < 0 for r in records):
        raise DataError(f"{root} split '{split}' has rows without a label (-1): the HF test split "
                        "is unlabelled; convert train and validation only")
    classes = classes or names or [str(i) for i in range(1 + max(r.label for r in records))]
    return records, classes


def _is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def list_folders(root: str, split: str, classes: list[str] | None = None):
    """Records of a local ILSVRC folder split (class folders, or flat val + Kaggle CSV)."""
    dataset = ImageFolderDataset(root, split, classes=classes)
    records = [Record(path, 0, -1, label, PurePosixPath(path).name)
               for path, label in dataset.samples]
    return records, dataset.classes


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start + size) of a random-access file."""

    def __init__(self, handle, start: int, size: int):
        self.handle, self.start, self.size, self.pos = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.pos))
        data = self.handle.read_at(count, self.start + self.pos) if count else b""
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _members(handle, start: int, size: int):
    """(name, absolute data offset, size) of the regular files in the tar at [start, +size)."""
    window = io.BufferedReader(_Window(handle, start, size), buffer_size=1 << 16)
    with tarfile.open(fileobj=window, mode="r:") as archive:  # seeks over data: reads headers only
        for member in archive:
            if member.isfile():
                yield member.name, start + member.offset_data, member.size


def list_train_tar(uri: str):
    """Records of ILSVRC2012_img_train.tar: one class tar (`n01440764.tar`) per class inside."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as handle:
        inner = sorted(m for m in _members(handle, 0, handle.size()) if m[0].endswith(".tar"))
        if not inner:
            raise DataError(f"{uri} holds no class tars (n01440764.tar, ...): is it {TRAIN_TAR}?")
        classes = [PurePosixPath(name).stem for name, _, _ in inner]
        records = []
        for label, (_, start, size) in enumerate(inner):
            records += [Record(path, offset, length, label, PurePosixPath(name).name)
                        for name, offset, length in _members(handle, start, size)
                        if _is_image(name)]
    return records, classes


def _val_labels(uri: str) -> dict[str, str]:
    """ImageId -> wnid from Kaggle's LOC_val_solution.csv (local or S3)."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        rows = csv.DictReader(io.StringIO(stream.read().decode()))
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}


def list_val_tar(uri: str, solution_uri: str, classes: list[str]):
    """Records of ILSVRC2012_img_val.tar (flat JPEGs) labelled by LOC_val_solution.csv."""
    wnids, index = _val_labels(solution_uri), {name: i for i, name in enumerate(classes)}
    fs, path = filesystem(uri)
    records = []
    with fs.open_input_file(path) as handle:
        for name, offset, size in _members(handle, 0, handle.size()):
            if not _is_image(name):
                continue
            wnid = wnids.get(PurePosixPath(name).stem)
            if wnid not in index:
                raise DataError(f"{name} in {uri} has no known label in {solution_uri} "
                                f"(got {wnid!r})")
            records.append(Record(path, offset, size, index[wnid], PurePosixPath(name).name))
    return records


def list_source(source: str, split: str, classes: list[str] | None = None):
    """(records, classes) of one split of `source`: a folder root, a directory of tars, or
    HF-style parquet shards."""
    fs, path = filesystem(source)
    tar_name = TRAIN_TAR if split == "train" else VAL_TAR
    tar_path = f"{path.rstrip('/')}/{tar_name}"
    if fs.get_file_info(tar_path).type != pafs.FileType.File:
        try:
            find_parquet_shards(fs, path.rstrip("/"), split)
        except DataError as no_parquet:
            if "://" in source:
                raise DataError(f"no {tar_name} and {no_parquet} (image folders must be local; "
                                "tars and parquet shards may be local or on S3)") from None
            return list_folders(path, split, classes)
        return list_parquet(source, split, classes)
    base = source.rstrip("/")
    if split == "train":
        return list_train_tar(f"{base}/{TRAIN_TAR}")
    if classes is None:
        raise DataError("the val tar is labelled with the train tar's classes: list train first")
    return list_val_tar(f"{base}/{VAL_TAR}", f"{base}/{VAL_SOLUTION_CSV}", classes), classes
