"""The data set checked before any worker starts: the first run's classic mistake is a wrong
`data.root` (a typo, the class-folder tree where shards are expected, an empty prefix), and each
worker restart it would cause costs minutes on a GPU cluster.

`check_data` looks for both splits, counts the classes against `data.num_classes` and reads one
file's footer (the credentials work), reading listings and footers only. Every failure is a
`DataError` (exit code 2) saying what was found and what to set.
"""
from __future__ import annotations

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rn50.config import DataConfig
from rn50.data.common import DataError, find_parquet_shards, hf_label_names
from rn50.io import storage

SPLITS = ("train", "val")


def _listing(fs: pafs.FileSystem, path: str, limit: int = 6) -> list[str]:
    """Up to `limit` names directly under `path` (what a message shows was found there)."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(info.base_name + ("/" if info.type == pafs.FileType.Directory else "")
                   for info in infos)
    return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


def _open(root: str) -> tuple[pafs.FileSystem, str]:
    try:
        return storage.filesystem_and_path(root)
    except storage.StorageError as err:
        raise DataError(f"data.root={root!r}: {err}") from None


def check_parquet(root: str, num_classes: int) -> str:
    """Shards for both splits under `root`, readable, with `num_classes` classes."""
    fs, base = _open(root)
    try:
        found = _listing(fs, base)
    except OSError as err:
        raise DataError(f"cannot list data.root={root!r}: {storage.explain_error(err, root)}") \
            from None
    if not found:
        raise DataError(f"data.root={root!r} is empty or does not exist: point it at the parquet "
                        "shards ray_jobs/prepare_imagenet.py writes (train/ and val/ shards)")
    shards = {}
    for split in SPLITS:
        try:
            shards[split] = find_parquet_shards(fs, base, split)
        except DataError as err:
            hint = ("it holds class folders: set data.dataset=imagefolder for that layout, or "
                    "point data.root at the shards ray_jobs/prepare_imagenet.py writes"
                    if any(name.rstrip("/") in SPLITS for name in found) else
                    "set data.root to the folder holding the shards")
            raise DataError(f"{err}; found there: {found}; {hint}") from None
    try:
        with fs.open_input_file(shards["val"][0]) as handle:
            names = hf_label_names(pq.ParquetFile(handle).schema_arrow.metadata)
    except OSError as err:
        raise DataError(f"cannot read {shards['val'][0]}: {storage.explain_error(err, root)}") \
            from None
    if names is not None and len(names) != num_classes:
        raise DataError(f"the shards under {root} have {len(names)} classes but "
                        f"data.num_classes is {num_classes}: set data.num_classes={len(names)}")
    return (f"{len(shards['train'])} train and {len(shards['val'])} val shards"
            + (f", {len(names)} classes" if names else ""))


def check_image_folders(root: str, num_classes: int) -> str:
    """`root/train/<class>/` folders, as many as `num_classes`, and a `root/val/`."""
    fs, base = _open(root)
    found = _listing(fs, base)
    missing = [split for split in SPLITS if f"{split}/" not in found]
    if missing:
        raise DataError(f"data.root={root!r} has no {' and no '.join(missing)}/ folder (found "
                        f"{found or 'nothing'}): an image-folder data set needs "
                        f"{root}/train/<class>/*.jpg and {root}/val/...")
    classes = [info for info in fs.get_file_info(pafs.FileSelector(f"{base}/train"))
               if info.type == pafs.FileType.Directory]
    if len(classes) != num_classes:
        raise DataError(f"{root}/train has {len(classes)} class folders but data.num_classes is "
                        f"{num_classes}: set data.num_classes={len(classes)}, or point data.root "
                        "at the full data set")
    return f"{len(classes)} class folders"


def check_data(data: DataConfig) -> str:
    """Check `data` (parquet shards or image folders) before any worker starts; a one-line
    summary of what was found, or DataError. Digits and Imagenette are prepared by the workers
    themselves (written or downloaded to their cache) and are not checked here."""
    if data.dataset == "parquet":
        return check_parquet(data.root, data.num_classes)
    if data.dataset == "imagefolder":
        return check_image_folders(data.root, data.num_classes)
    return f"{data.dataset}: prepared by the workers"
