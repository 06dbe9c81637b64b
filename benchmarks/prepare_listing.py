"""ImageNet preparation on the local S3 server: S3 requests per image for the listing and images/s
per core end to end (listing + conversion), on a synthetic ILSVRC-shaped tar set, with the
projection to full ImageNet on the `cpu.spot` nodes of cluster.yaml.

    python -m benchmarks.prepare_listing                      # 100 classes x 100 sample JPEGs
    python -m benchmarks.prepare_listing --images small \
        --result benchmarks/results/prepare_listing_small.json     # 100 x 100 small JPEGs
    python -m benchmarks.prepare_listing --classes 10 --per-class 20 --no-write   # smoke check

The tars are written with benchmarks/ilsvrc_tars.py from the 1,000 real ImageNet JPEGs beside
the repository (cycled; generated ImageNet-like JPEGs when they are absent) or small generated
ones, uploaded to a SeaweedFS S3 server (tools.local_servers.S3Server), and prepared by
rn50.distributed.prepare on a local Ray with --cpus CPUs, exactly as ray_jobs/prepare_imagenet.py
does. Requests are the server's own counts (SeaweedFS_s3_request_total), so requests made by Ray
tasks in other processes count too. Phases: cold listing (train, val), warm listing (from
OUT/_plan.json), conversion. Writes benchmarks/results/prepare_listing.json (or --result; not
with --no-write) and prints it. Listing costs ~2-3 requests per class tar (its header in the
outer tar, then one open + one read per task), so requests per image fall with images per class:
ImageNet's ~1,281 per class is projected in the JSON's `projection`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.ilsvrc_tars import TRAIN_TAR, VAL_CSV, VAL_TAR, synthetic_ilsvrc
from benchmarks.images import DEFAULT_IMAGES, find_jpegs, generate_jpegs
from benchmarks.prepare_projection import project
from benchmarks.results import write_result
from rn50.io.s3 import s3_uri
from tools.local_servers import S3Server

REPO = Path(__file__).resolve().parents[1]

RESULT = REPO / "benchmarks" / "results" / "prepare_listing.json"


def jpeg_pool(kind: str, directory: Path) -> tuple[list[bytes], str]:
    """The JPEG bytes the tars cycle through, and where they came from."""
    if kind == "small":
        rng, pool = np.random.default_rng(0), []
        for index in range(200):  # 64-128 px, smooth + grain: ~2-5 KB, like thumbnails
            width, height = (int(v) for v in rng.integers(64, 129, 2))
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, "JPEG", quality=85)
            pool.append(out.getvalue())
        return pool, "200 generated JPEGs of 64-128 px (seed 0)"
    paths = find_jpegs(DEFAULT_IMAGES) if DEFAULT_IMAGES.is_dir() else []
    if paths:
        return [p.read_bytes() for p in paths], f"the {len(paths)} JPEGs of {DEFAULT_IMAGES}"
    paths = generate_jpegs(directory, 500)
    return [p.read_bytes() for p in paths], "500 generated ImageNet-like JPEGs (seed 0)"


def counted(server: S3Server, phase: dict, action):
    """Run `action`, recording its seconds and the S3 requests it caused into `phase`."""
    before, started = server.request_counts(), time.perf_counter()
    result = action()
    phase["seconds"] = round(time.perf_counter() - started, 3)
    after = server.request_counts()
    phase["requests"] = {k: after.get(k, 0) - before.get(k, 0) for k in after
                         if after.get(k, 0) != before.get(k, 0)}
    return result


def run_phases(server: S3Server, source: str, out: str, options: dict, cpus: int) -> dict:
    """Cold listing, warm listing and conversion, each timed and counted."""
    import ray

    from rn50.data.imagenet_shards import plan_shards, write_manifest
    from rn50.data.plan_cache import cached_listing
    from rn50.distributed.prepare import convert, ray_map
    from rn50.distributed.ray_setup import init_ray

    started = time.perf_counter()
    init_ray(cpus, exact=True)
    phases: dict = {"ray_init": {"seconds": round(time.perf_counter() - started, 3)}}
    listed: dict = {}
    for label, splits in (("cold", ("train", "val")), ("warm", ("train", "val"))):
        classes = None
        for split in splits:
            phase = phases[f"listing_{label}_{split}"] = {}
            records, classes, cached = counted(server, phase, lambda: cached_listing(
                source, split, classes, out, ray_map))
            phase.update(images=len(records), from_plan_json=cached)
            listed[split] = records
    items = [item for split, records in listed.items()
             for item in plan_shards(records, split, options["images_per_shard"], options["seed"])]
    phase = phases["conversion"] = {"shards": len(items)}
    entries = counted(server, phase, lambda: convert(items, out, classes, options, log=lambda _: 0))
    manifest = write_manifest(out, entries, classes, options)
    phase["images"] = sum(e["rows"] for e in entries)
    phases["manifest_images"] = {s: v["images"] for s, v in manifest["splits"].items()}
    ray.shutdown()
    return phases


def figures(phases: dict, cpus: int) -> dict:
    """Requests per image and images/s per core from the phases."""
    def total(phase: dict) -> int:
        return sum(phase.get("requests", {}).values())
    out = {}
    images = 0
    for split in ("train", "val"):
        cold = phases[f"listing_cold_{split}"]
        images += cold["images"]
        out[f"listing_requests_per_image_{split}"] = round(total(cold) / cold["images"], 5)
    listing_s = sum(phases[f"listing_cold_{s}"]["seconds"] for s in ("train", "val"))
    listing_requests = sum(total(phases[f"listing_cold_{s}"]) for s in ("train", "val"))
    conversion = phases["conversion"]
    out.update({
        "listing_requests_per_image": round(listing_requests / images, 5),
        "listing_requests_per_image_warm": round(sum(
            total(phases[f"listing_warm_{s}"]) for s in ("train", "val")) / images, 5),
        "listing_seconds_cold": round(listing_s, 2),
        "listing_seconds_warm": round(sum(phases[f"listing_warm_{s}"]["seconds"]
                                          for s in ("train", "val")), 2),
        "listing_images_per_s_per_core": round(images / listing_s / cpus, 1),
        "conversion_requests_per_image": round(total(conversion) / conversion["images"], 4),
        "conversion_images_per_s_per_core": round(conversion["images"] / conversion["seconds"]
                                                  / cpus, 1),
        "end_to_end_images_per_s_per_core": round(
            images / (listing_s + conversion["seconds"]) / cpus, 1),
        "images": images, "cpus": cpus})
    return out


def upload(server: S3Server, local: Path, prefix: str) -> None:
    """The three ILSVRC files into the server's bucket under `prefix`."""
    client = server.client()
    for name in (TRAIN_TAR, VAL_TAR, VAL_CSV):
        client.upload_file(str(local / name), server.bucket, f"{prefix}/{name}")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--images", choices=("sample", "small"), default="sample",
                        help="real ImageNet JPEGs (cycled) or small generated ones")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs of the local Ray (the figures are per CPU)")
    parser.add_argument("--max-px", type=int, default=256)
    parser.add_argument("--images-per-shard", type=int, default=1024)
    parser.add_argument("--result", default=str(RESULT), help="where to write the JSON")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Make the tars, start S3, run the phases, write and print the JSON."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rn50-prepare-bench-") as tmp:
        pool, pool_source = jpeg_pool(args.images, Path(tmp) / "generated")
        shape = synthetic_ilsvrc(Path(tmp) / "tars", pool, args.classes, args.per_class,
                                 args.val_per_class)
        server = S3Server(Path(tmp) / "s3")
        server.start()
        try:
            upload(server, Path(tmp) / "tars", "ilsvrc")
            os.environ.update(server.env())
            source, out = s3_uri(server.bucket, "ilsvrc"), s3_uri(server.bucket, "prepared")
            options = {"source": source, "max_px": args.max_px,
                       "images_per_shard": args.images_per_shard, "seed": 0}
            phases = run_phases(server, source, out, options, args.cpus)
        finally:
            server.stop()
    measured = figures(phases, args.cpus)
    context = {"tars": {**shape, "jpegs": pool_source, "max_px": args.max_px}, "phases": phases,
               "projection": project(measured, phases, shape)}
    if not args.no_write:
        write_result("prepare_listing", measured,
                     ["benchmarks/prepare_listing.py", *(sys.argv[1:] if argv is None else argv)],
                     path=args.result, context=context)
    result = {"figures": measured, **context}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
