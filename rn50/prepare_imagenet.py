"""ImageNet -> shuffled parquet shards on S3 (or a folder), with Ray Data; resumable, idempotent.

    rn50-prepare-imagenet --source s3://B/ilsvrc --out s3://B/imagenet-parquet --max-px 256

(also `python -m rn50.prepare_imagenet` and `python ray_jobs/prepare_imagenet.py`).

`--source` is a directory holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and Kaggle's
LOC_val_solution.csv (local or s3://; the tars are read in place, never unpacked), Hugging Face
`ILSVRC/imagenet-1k` parquet shards (data/{train,validation}-*.parquet, local or s3://), or a local
ILSVRC folder tree (train/<wnid>/*.JPEG, val/ as class folders or flat + LOC_val_solution.csv;
on a multi-node cluster it must be on a filesystem every node mounts). The train tar's class tars
are listed in parallel (Ray tasks, a few large reads each) and the listing is kept in
`OUT/_plan.json`, reused while the source files keep their size and mtime. Shards already written
and still matching their plan and checksum are skipped, so rerunning after a crash finishes the
rest. Ends with `RESULT {...}`; `OUT/manifest.json` lists every shard with its rows and SHA-256,
and the classes by readable name (`tench`) with their wnids. The work is
`rn50.distributed.prepare`.
"""
import argparse
import json
import sys

from rn50.data.datasets import DataError
from rn50.io.storage import StorageError, absolute, preflight


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True,
                        help="dir with the ILSVRC tars, HF parquet shards, or folders")
    parser.add_argument("--out", required=True, help="s3://bucket/prefix or a local directory")
    parser.add_argument("--max-px", type=int, default=256,
                        help="shorter side cap, re-encoding larger images; 0 keeps originals")
    parser.add_argument("--images-per-shard", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle into shards")
    parser.add_argument("--splits", default="train,val")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Parse `argv`, write the shards, print `RESULT {...}`; 2 on a user error."""
    args = _arguments(argv)
    options = {"source": args.source.rstrip("/"), "max_px": args.max_px,
               "images_per_shard": args.images_per_shard, "seed": args.seed}
    try:
        preflight(args.out)  # a wrong bucket or key fails now, not after the listing
        from rn50.distributed.prepare import prepare  # imports Ray: after the cheap checks
        manifest, entries = prepare(args.source, args.out, args.splits.split(","), options,
                                    log=lambda line: print(line, flush=True))
    except (DataError, StorageError, FileNotFoundError) as err:
        # A listing task's error arrives wrapped by Ray: print what the task said.
        print(f"error: {getattr(err, 'cause', None) or err}", file=sys.stderr)
        return 2
    summary = {"out": absolute(args.out), "classes": len(manifest["classes"]),
               "images": {s: v["images"] for s, v in manifest["splits"].items()},
               "shards": len(entries), "written": sum(not e["skipped"] for e in entries),
               "skipped": sum(bool(e["skipped"]) for e in entries)}
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
