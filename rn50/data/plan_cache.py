"""`OUT/_plan.json`: a source's listing kept beside the output, so a rerun does not list again.

Listing ILSVRC2012_img_train.tar reads the whole tar once (see rn50.data.tar_listing); a rerun
after a crash or preemption reuses the records instead, as long as the source is unchanged: each
split's entry is keyed on the size and modification time of every file its listing read (the
tars, the val CSV, the parquet shards) and, for val, the train classes it was labelled with.
Image folders are not cached: walking them is the check. No Ray here.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable

import pyarrow.fs as pafs

from rn50.io.storage import filesystem_and_path
from rn50.data.imagenet_sources import Record, list_source, source_files

PLAN_FILE = "_plan.json"
FORMAT = "rn50-imagenet-listing/1"
_COLUMNS = ("offset", "size", "label", "name", "row")


def source_key(source: str, split: str, classes: list[str] | None) -> str | None:
    """What identifies a listing of `split`: its files' paths, sizes and mtimes (None: folders)."""
    kind, paths = source_files(source, split)
    if kind == "folders":
        return None
    fs, _ = filesystem_and_path(source)
    files = [[info.path, info.size, info.mtime_ns] for info in fs.get_file_info(paths)]
    text = json.dumps([FORMAT, split, files, classes if split != "train" else None])
    return hashlib.sha256(text.encode()).hexdigest()


def _read(out: str) -> dict:
    fs, root = filesystem_and_path(out)
    try:
        with fs.open_input_stream(f"{root}/{PLAN_FILE}") as stream:
            plan = json.loads(stream.read())
        return plan if plan.get("format") == FORMAT else {}
    except (OSError, ValueError):  # none yet, or half written: list again
        return {}


def _encode(records: list[Record], classes: list[str], key: str) -> dict:
    sources = sorted({r.source for r in records})
    index = {source: i for i, source in enumerate(sources)}
    columns = {name: [getattr(r, name) for r in records] for name in _COLUMNS}
    return {"key": key, "classes": classes, "sources": sources,
            "source": [index[r.source] for r in records], **columns}


def decode_sample(entry: dict) -> list[Record]:
    sources = entry["sources"]
    return [Record(sources[s], *values)
            for s, *values in zip(entry["source"], *(entry[name] for name in _COLUMNS))]


def load_listing(out: str, split: str, key: str) -> tuple[list[Record], list[str]] | None:
    """The cached (records, classes) of `split` if `OUT/_plan.json` has them under `key`."""
    entry = _read(out).get("splits", {}).get(split)
    if not entry or entry.get("key") != key:
        return None
    return decode_sample(entry), entry["classes"]


def save_listing(out: str, split: str, key: str, records: list[Record],
                 classes: list[str]) -> None:
    """Store `split`'s listing in `OUT/_plan.json`, keeping the other splits' entries."""
    plan = _read(out) or {"format": FORMAT, "splits": {}}
    plan["splits"][split] = _encode(records, classes, key)
    fs, root = filesystem_and_path(out)
    fs.create_dir(root, recursive=True)
    path = f"{root}/{PLAN_FILE}"
    # Written whole under a temporary name on local disks (an S3 object appears complete or
    # not at all), so a crash mid-write leaves the old plan or none, never half of one.
    temporary = path + ".partial" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(plan, separators=(",", ":")).encode())
    if temporary != path:
        fs.move(temporary, path)


def cached_listing(source: str, split: str, classes: list[str] | None, out: str,
                   map_fn: Callable = map) -> tuple[list[Record], list[str], bool]:
    """(records, classes, whether they came from the cache) of `split`: from `OUT/_plan.json`
    when the source is unchanged, else listed (through `map_fn`) and stored there."""
    key = source_key(source, split, classes)
    cached = load_listing(out, split, key) if key else None
    if cached is not None:
        return *cached, True
    records, classes = list_source(source, split, classes, map_fn)
    if key:
        save_listing(out, split, key, records, classes)
    return records, classes, False
