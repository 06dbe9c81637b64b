"""What the data modules share without importing torch: the data error, file-name conventions
and the Hugging Face parquet helpers. ImageNet listing and shard writing (Ray tasks on CPU nodes)
import only this, not rn50.data.datasets, so a fresh worker starts in a fraction of a second."""
from __future__ import annotations

import json

import pyarrow.fs as pafs

from rn50.errors import PermanentError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VAL_SOLUTION_CSV = "LOC_val_solution.csv"


class DataError(PermanentError, RuntimeError):
    """The data set is missing, malformed or cannot be fetched; the message says what to do.
    A restart would meet it again: a run ends on it at once (exit code 2), never retried."""
    exit_code = 2


_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid")}


def find_parquet_shards(fs: pafs.FileSystem, base: str, split: str) -> list[str]:
    """HF `data/<split>-00000-of-000NN.parquet`, or `<split>/*.parquet`, or `<split>-*.parquet`."""
    def listing(directory: str) -> list[str]:
        selector = pafs.FileSelector(directory, allow_not_found=True)
        return sorted(i.path for i in fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    for name in _SPLIT_NAMES.get(split, (split,)):
        for directory, prefix in ((f"{base}/data", f"{name}-"), (f"{base}/{name}", ""),
                                  (base, f"{name}-")):
            found = [p for p in listing(directory) if p.rsplit("/", 1)[-1].startswith(prefix)]
            if found:
                return found
    raise DataError(f"no parquet shards for split '{split}' under '{base}' (looked for "
                    f"data/{split}-*.parquet and {split}/*.parquet)")


def image_bytes(table) -> list[bytes | None]:
    """The encoded images of a parquet table's `image` column (plain binary, or HF's Image
    feature: struct<bytes, path>)."""
    images = table.column("image").combine_chunks()
    if hasattr(images, "field"):
        images = images.field("bytes")
    return images.to_pylist()


def hf_label_names(metadata: dict | None) -> list[str] | None:
    """ClassLabel names stored by HF `datasets` in the arrow schema metadata, if present."""
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        return list(features["label"]["names"]) or None
    except (TypeError, KeyError, ValueError):
        return None

