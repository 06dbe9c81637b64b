"""Shuffled parquet shards of JPEG bytes + labels, in the layout `rn50.datasets.ParquetDataset`
reads: `OUT/{train,val}/{split}-00000-of-01252.parquet`, columns `image` {bytes, path} and
`label`, the source's class labels (wnids, or Hugging Face's label names) in the Hugging Face
schema metadata, and `OUT/manifest.json` with the readable names (`tench`) and the wnids beside.

Each shard is written whole by one task (`write_shard`) and verified by a sidecar
`OUT/_progress/<shard>.json` holding the plan hash and the file's SHA-256: a rerun skips every
shard whose file still matches, so the conversion is resumable and idempotent. No Ray here.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from rn50.io import storage
from rn50.data.class_names import readable_classes
from rn50.data.imagenet_sources import Record, read_records

JPEG_QUALITY = 90
ROW_GROUP_ROWS = 128  # ParquetDataset reads whole row groups: keep them a few MB


def plan_shards(records: list[Record], split: str, per_shard: int, seed: int) -> list[dict]:
    """Shuffle `records` with `seed` and cut them into shard work items (JSON-safe dicts).

    Files and tar members are shuffled one by one (each is one ranged read). Parquet rows are
    shuffled as whole row groups, then row by row within each shard: a shard then reads a few
    row groups once instead of one row group per image; the training loader adds its own
    per-epoch shuffle of row groups and of rows within them."""
    rng = random.Random(seed)
    blocks: dict = {}
    for record in records:
        key = (record.source, record.offset) if record.row >= 0 else len(blocks)
        blocks.setdefault(key, []).append(record)
    shuffled = list(blocks.values())
    rng.shuffle(shuffled)
    order = [record for block in shuffled for record in block]
    count = max(1, -(-len(order) // per_shard))
    items = []
    for index in range(count):
        chunk = order[index * per_shard:(index + 1) * per_shard]
        if len(shuffled) < len(order):  # some blocks hold several rows: mix them within the shard
            rng.shuffle(chunk)
        rows = [{k: v for k, v in asdict(r).items() if k != "row" or v >= 0} for r in chunk]
        items.append({"split": split, "index": index, "count": count,
                      "name": f"{split}-{index:05d}-of-{count:05d}.parquet",
                      "records": json.dumps(rows)})
    return items


def _plan_hash(item: dict, options: dict) -> str:
    """Identifies what a shard should contain: its images, in order, and the options."""
    text = json.dumps([item["records"], item["name"], options], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def shrink(data: bytes, max_px: int) -> bytes:
    """Re-encode as JPEG with the shorter side <= `max_px`; smaller images pass through as is."""
    if max_px <= 0:
        return data
    try:
        image = Image.open(io.BytesIO(data))
        if min(image.size) <= max_px:
            return data  # never re-encode what needs no resizing: that only loses quality
        scale = max_px / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image.draft("RGB", size)  # DCT-domain downscale first: several times faster
        image = image.convert("RGB").resize(size, Image.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()
    except Exception:  # noqa: BLE001 - corrupt or exotic, whatever Pillow raises for it
        return data  # kept as it is: training skips what it cannot decode


def _schema(classes: list[str]) -> pa.Schema:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    # The same metadata Hugging Face `datasets` writes, so readers get the wnids as class names.
    features = {"image": {"_type": "Image"},
                "label": {"names": classes, "_type": "ClassLabel"}}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([("image", image), ("label", pa.int64())], metadata=metadata)


def _existing(fs, out_path: str, sidecar: str, plan: str) -> dict | None:
    """The sidecar of a finished shard that still matches its plan and its bytes, else None."""
    try:
        with fs.open_input_stream(sidecar) as stream:
            entry = json.loads(stream.read())
        if entry.get("plan") == plan and storage.sha256_of(fs, out_path) == entry.get("sha256"):
            return entry
    except (OSError, ValueError):  # missing, half written or unreadable: rewrite the shard
        pass
    return None


def write_shard(item: dict, out: str, classes: list[str], options: dict) -> dict:
    """Write one shard (unless a verified copy exists); return its manifest entry."""
    fs, root = storage.filesystem_and_path(out)
    split_dir, progress_dir = f"{root}/{item['split']}", f"{root}/_progress"
    out_path, sidecar = f"{split_dir}/{item['name']}", f"{progress_dir}/{item['name']}.json"
    plan = _plan_hash(item, options)
    done = _existing(fs, out_path, sidecar, plan)
    if done is not None:
        return {**done, "skipped": True}
    records = [Record(**r) for r in json.loads(item["records"])]
    source_fs, _ = storage.filesystem_and_path(options["source"])
    images = [{"bytes": shrink(data, options["max_px"]), "path": r.name}
              for r, data in zip(records, read_records(source_fs, records))]
    table = pa.table({"image": images, "label": [r.label for r in records]},
                     schema=_schema(classes))
    for directory in (split_dir, progress_dir):
        fs.create_dir(directory, recursive=True)
    # A local file appears under its final name only when complete; an S3 object only exists
    # once its upload completes. Either way a reader never sees half a shard.
    temporary = out_path + ".partial" if isinstance(fs, pafs.LocalFileSystem) else out_path
    buffer = pa.BufferOutputStream()  # hashed in memory: no read-back of the upload
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
    data = buffer.getvalue()
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    if temporary != out_path:
        fs.move(temporary, out_path)
    entry = {"name": item["name"], "split": item["split"], "rows": len(records),
             "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest(), "plan": plan}
    with fs.open_output_stream(sidecar) as stream:
        stream.write(json.dumps(entry).encode())
    return {**entry, "skipped": False}


def write_manifest(out: str, entries: list[dict], classes: list[str], options: dict) -> dict:
    """`OUT/manifest.json`: per split the shards (rows, bytes, SHA-256), totals, and the classes:
    readable names (`classes`), ImageNet wnids (`class_wnids`, or null) and the shards' labels."""
    splits: dict = {}
    for entry in sorted(entries, key=lambda e: (e["split"], e["name"])):
        split = splits.setdefault(entry["split"], {"images": 0, "shards": []})
        split["images"] += entry["rows"]
        split["shards"].append({k: entry[k] for k in ("name", "rows", "bytes", "sha256")})
    names, wnids = readable_classes(classes)
    manifest = {"format": "rn50-imagenet-parquet/2", "classes": names, "class_wnids": wnids,
                "class_labels": classes, "splits": splits,
                "options": {k: v for k, v in options.items() if k != "source"},
                "source": options["source"]}
    fs, root = storage.filesystem_and_path(out)
    with fs.open_output_stream(f"{root}/manifest.json") as stream:
        stream.write(json.dumps(manifest, indent=1).encode())
    return manifest
