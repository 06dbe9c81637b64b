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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rn50.data.common import (IMAGE_EXTENSIONS, VAL_SOLUTION_CSV, DataError,
                              find_parquet_shards, hf_label_names, image_bytes)
from rn50.data.tar_listing import TarListingError, group_ranges, members_of_range, tar_members
from rn50.io.storage import explain_error, filesystem_and_path

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TASK_BYTES = 1 << 26  # class tars listed per task: at least 64 MB (one ImageNet class tar)
READ_THREADS = 8      # concurrent image reads per shard task


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


def read_records(fs: pafs.FileSystem, records: list[Record],
                 threads: int = READ_THREADS) -> list[bytes]:
    """The image bytes of `records`, in order; byte ranges are read `threads` at a time."""
    handles: dict = {}
    if any(r.row >= 0 for r in records) or threads <= 1:  # row groups: read once, in order
        return [read_record(fs, r, handles) for r in records]
    for source in {r.source for r in records if r.size >= 0}:
        handles[source] = fs.open_input_file(source)  # read_at is safe from several threads
    # On S3 each image is a request of ~30 ms: overlapping them keeps the task on the CPU.
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda r: read_record(fs, r, handles), records))
    finally:
        for handle in handles.values():
            handle.close()


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
    fs, base = filesystem_and_path(root)
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
    from rn50.data.datasets import ImageFolderDataset  # torch: only the folder path needs it
    dataset = ImageFolderDataset(root, split, classes=classes)
    records = [Record(path, 0, -1, label, PurePosixPath(path).name)
               for path, label in dataset.samples]
    return records, dataset.classes


def list_class_tars(uri: str, tars: list[tuple[str, int, int, int]]) -> list[Record]:
    """Records of class tars (name, start, size, label) lying back to back in the train tar at
    `uri`, read with one large read (a listing task: see `list_train_tar`)."""
    fs, path = filesystem_and_path(uri)
    with _opened(fs, path, uri) as handle:
        listed = members_of_range(handle, [(n, s, z) for n, s, z, _ in tars], uri)
    return [Record(path, offset, length, label, PurePosixPath(name).name)
            for (_, _, _, label), members in zip(tars, listed)
            for name, offset, length in members if _is_image(name)]


def list_train_tar(uri: str, map_fn: Callable = map):
    """Records of ILSVRC2012_img_train.tar: one class tar (`n01440764.tar`) per class inside.

    The outer tar's 1,000 headers are read here; the class tars are listed by
    `list_class_tars` in runs of >= TASK_BYTES, through `map_fn(function, *argument lists)`
    (`map` here; Ray tasks in `rn50.distributed.prepare`)."""
    fs, path = filesystem_and_path(uri)
    with _opened(fs, path, uri) as handle:
        inner = sorted(m for m in tar_members(handle, 0, handle.size(), uri)
                       if m[0].endswith(".tar"))
    if not inner:
        raise DataError(f"{uri} holds no class tars (n01440764.tar, ...): is it {TRAIN_TAR}? "
                        "Upload the ILSVRC2012 train tar as it was downloaded")
    classes = [PurePosixPath(name).stem for name, _, _ in inner]
    groups = [[(*inner[i], i) for i in group] for group in group_ranges(inner, TASK_BYTES)]
    parts = map_fn(list_class_tars, [uri] * len(groups), groups)
    return [record for part in parts for record in part], classes


@contextmanager
def _opened(fs: pafs.FileSystem, path: str, uri: str):
    """`fs.open_input_file(path)`, with read failures turned into a DataError saying what to do."""
    try:
        with fs.open_input_file(path) as handle:
            yield handle
    except TarListingError as err:
        raise DataError(f"{err}: re-upload {uri} (its size must match the original)") from None
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist: check --source") from None
    except OSError as err:
        raise DataError(f"cannot read {uri}: {explain_error(err, uri)}") from None


def _val_labels(uri: str) -> dict[str, str]:
    """ImageId -> wnid from Kaggle's LOC_val_solution.csv (local or S3)."""
    fs, path = filesystem_and_path(uri)
    try:
        with fs.open_input_stream(path) as stream:
            rows = csv.DictReader(io.StringIO(stream.read().decode()))
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist: the val tar is labelled by Kaggle's "
                        f"{VAL_SOLUTION_CSV}; upload it beside {VAL_TAR}") from None
    except (KeyError, IndexError, UnicodeDecodeError) as err:
        raise DataError(f"{uri} is not Kaggle's {VAL_SOLUTION_CSV} (columns ImageId, "
                        f"PredictionString; {err!r})") from None
    except OSError as err:
        raise DataError(f"cannot read {uri}: {explain_error(err, uri)}") from None


def list_val_tar(uri: str, solution_uri: str, classes: list[str]):
    """Records of ILSVRC2012_img_val.tar (flat JPEGs) labelled by LOC_val_solution.csv."""
    wnids, index = _val_labels(solution_uri), {name: i for i, name in enumerate(classes)}
    fs, path = filesystem_and_path(uri)
    records = []
    with _opened(fs, path, uri) as handle:
        for name, offset, size in tar_members(handle, 0, handle.size(), uri):
            if not _is_image(name):
                continue
            wnid = wnids.get(PurePosixPath(name).stem)
            if wnid is None:
                raise DataError(f"{name} in {uri} has no row in {solution_uri}: the CSV must be "
                                "the one for ILSVRC2012's val images")
            if wnid not in index:
                raise DataError(f"{name} in {uri} is of class {wnid}, which the train tar does "
                                f"not have ({len(classes)} classes): the train tar is missing a "
                                "class tar, or the tars come from different data sets")
            records.append(Record(path, offset, size, index[wnid], PurePosixPath(name).name))
    return records


def source_files(source: str, split: str) -> tuple[str, list[str]]:
    """(kind, paths): `tars`, `parquet` or `folders`, and the files a listing of `split` reads
    (none for folders, whose listing is its own check), on `filesystem_and_path(source)`."""
    fs, path = filesystem_and_path(source)
    base = path.rstrip("/")
    tar_path = f"{base}/{TRAIN_TAR if split == 'train' else VAL_TAR}"
    try:
        if fs.get_file_info(tar_path).type == pafs.FileType.File:
            return "tars", [tar_path] + ([] if split == "train" else [f"{base}/{VAL_SOLUTION_CSV}"])
        try:
            return "parquet", find_parquet_shards(fs, base, split)
        except DataError as no_parquet:
            bucket = base.split("/")[0]
            if "://" in source and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DataError(f"bucket '{bucket}' of {source} does not exist (or these "
                                "credentials cannot see it): fix --source") from None
            if "://" in source:
                raise DataError(f"no {PurePosixPath(tar_path).name} and {no_parquet} (image "
                                "folders must be local; tars and parquet shards may be local "
                                "or on S3)") from None
            return "folders", []
    except OSError as err:
        raise DataError(f"cannot list {source}: {explain_error(err, source)}") from None


def list_source(source: str, split: str, classes: list[str] | None = None,
                map_fn: Callable = map):
    """(records, classes) of one split of `source`: a folder root, a directory of tars, or
    HF-style parquet shards. `map_fn` runs the train tar's listing tasks (see list_train_tar)."""
    kind, _ = source_files(source, split)
    if kind == "folders":
        return list_folders(filesystem_and_path(source)[1], split, classes)
    if kind == "parquet":
        return list_parquet(source, split, classes)
    base = source.rstrip("/")
    if split == "train":
        return list_train_tar(f"{base}/{TRAIN_TAR}", map_fn)
    if classes is None:
        raise DataError("the val tar is labelled with the train tar's classes: list train first")
    return list_val_tar(f"{base}/{VAL_TAR}", f"{base}/{VAL_SOLUTION_CSV}", classes), classes
