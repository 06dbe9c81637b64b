"""ImageNet -> shuffled parquet shards on S3 (or a folder), with Ray Data; resumable, idempotent.

    python ray_jobs/prepare_imagenet.py --source s3://B/ilsvrc --out s3://B/imagenet-parquet \
        --max-px 256

`--source` is a directory holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and Kaggle's
LOC_val_solution.csv (local or s3://; the tars are read in place, never unpacked), Hugging Face
`ILSVRC/imagenet-1k` parquet shards (data/{train,validation}-*.parquet, local or s3://), or a local
ILSVRC folder tree (train/<wnid>/*.JPEG, val/ as class folders or flat + LOC_val_solution.csv;
on a multi-node cluster it must be on a filesystem every node mounts). Shards already written and
still matching their plan and checksum are skipped, so rerunning after a crash finishes the rest.
Ends with `RESULT {...}`; `OUT/manifest.json` lists every shard with its rows and SHA-256.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from rn50.data.datasets import DataError  # noqa: E402
from rn50.data.imagenet_shards import plan_shards, write_manifest, write_shard  # noqa: E402
from rn50.data.imagenet_sources import list_source  # noqa: E402
from rn50.io.storage import StorageError, preflight  # noqa: E402


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="dir with the ILSVRC tars, HF parquet shards, or folders")
    parser.add_argument("--out", required=True, help="s3://bucket/prefix or a local directory")
    parser.add_argument("--max-px", type=int, default=256,
                        help="shorter side cap, re-encoding larger images; 0 keeps originals")
    parser.add_argument("--images-per-shard", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle into shards")
    parser.add_argument("--splits", default="train,val")
    return parser.parse_args(argv)


def _plan(args) -> tuple[list[dict], list[str]]:
    """Shard work items for every split; val uses the train classes."""
    items, classes = [], None
    for split in args.splits.split(","):
        started = time.time()
        records, classes = list_source(args.source, split, classes)
        print(f"[prepare] {split}: {len(records)} images in {len(classes)} classes "
              f"(listed in {time.time() - started:.0f} s)", flush=True)
        items += plan_shards(records, split, args.images_per_shard, args.seed)
    return items, classes


def _convert(items: list[dict], out: str, classes: list[str], options: dict) -> list[dict]:
    """One Ray Data task per shard, reporting progress as shards finish."""
    import ray
    import ray.data
    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local Ray
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
        write_shard, fn_kwargs={"out": out, "classes": classes, "options": options},
        num_cpus=1, max_retries=3)  # a lost spot node only redoes its unfinished shards
    entries, started = [], time.time()
    for entry in dataset.iter_rows():
        entries.append(entry)
        if len(entries) % max(1, len(items) // 20) == 0 or len(entries) == len(items):
            print(f"[prepare] {len(entries)}/{len(items)} shards "
                  f"({sum(e['skipped'] for e in entries)} already done), "
                  f"{time.time() - started:.0f} s", flush=True)
    return entries


def main(argv=None) -> int:
    args = _arguments(argv)
    options = {"source": args.source.rstrip("/"), "max_px": args.max_px,
               "images_per_shard": args.images_per_shard, "seed": args.seed}
    try:
        preflight(args.out)  # a wrong bucket or key fails now, not after the listing
        items, classes = _plan(args)
        entries = _convert(items, args.out, classes, options)
        manifest = write_manifest(args.out, entries, classes, options)
    except (DataError, StorageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {"out": args.out, "classes": len(classes),
               "images": {s: v["images"] for s, v in manifest["splits"].items()},
               "shards": len(entries), "written": sum(not e["skipped"] for e in entries),
               "skipped": sum(bool(e["skipped"]) for e in entries)}
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
