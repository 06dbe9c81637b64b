"""ImageNet -> parquet shards on a Ray cluster: parallel listing, then one task per shard.

The listing of the train tar fans out as Ray tasks (one per run of class tars, see
`rn50.data.imagenet_sources.list_train_tar`) and is cached in `OUT/_plan.json`
(`rn50.data.plan_cache`); the conversion is one Ray Data task per shard (`write_shard`), which
skips shards already written and verified. `ray_jobs/prepare_imagenet.py` is the command line.
"""
from __future__ import annotations

import time
from typing import Callable

import ray
import ray.data

from rn50.distributed.ray_setup import init_ray
from rn50.data.class_names import imagenet_wnids, readable_classes
from rn50.data.imagenet_shards import plan_shards, write_manifest, write_shard
from rn50.data.plan_cache import cached_listing


def ray_map(function: Callable, *arguments: list) -> list:
    """`map(function, *arguments)` as Ray tasks of one CPU each, results in order."""
    # max_retries redoes a task whose node was lost (spot); errors of the task itself surface.
    remote = ray.remote(num_cpus=1, max_retries=3)(function)
    return ray.get([remote.remote(*args) for args in zip(*arguments)])


def _missing_note(classes: list[str]) -> str:
    """A warning when the classes are most, but not all, of ImageNet-1k's."""
    wnids = readable_classes(classes)[1] or []
    missing = sorted(set(imagenet_wnids()) - set(wnids))
    if len(wnids) < 900 or not missing:  # a deliberate subset, or all of them
        return ""
    return (f" WARNING: {len(missing)} of ImageNet-1k's classes are missing "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): is the train tar "
            "complete?")


def plan(source: str, out: str, splits: list[str], per_shard: int, seed: int,
         map_fn: Callable = ray_map, log: Callable = print) -> tuple[list[dict], list[str]]:
    """Shard work items for every split (val uses the train classes), listing each split once
    and caching the listing in `OUT/_plan.json`."""
    items, classes = [], None
    for split in splits:
        started = time.time()
        records, classes, cached = cached_listing(source, split, classes, out, map_fn)
        how = "from _plan.json" if cached else "listed"
        log(f"[prepare] {split}: {len(records)} images in {len(classes)} classes "
            f"({how} in {time.time() - started:.1f} s){_missing_note(classes)}")
        items += plan_shards(records, split, per_shard, seed)
    return items, classes


def convert(items: list[dict], out: str, classes: list[str], options: dict,
            log: Callable = print) -> list[dict]:
    """One Ray Data task per shard, reporting progress as shards finish."""
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
        write_shard, fn_kwargs={"out": out, "classes": classes, "options": options},
        num_cpus=1, max_retries=3)  # a lost spot node only redoes its unfinished shards
    entries, started = [], time.time()
    for entry in dataset.iter_rows():
        entries.append(entry)
        if len(entries) % max(1, len(items) // 20) == 0 or len(entries) == len(items):
            log(f"[prepare] {len(entries)}/{len(items)} shards "
                f"({sum(e['skipped'] for e in entries)} already done), "
                f"{time.time() - started:.0f} s")
    return entries


def prepare(source: str, out: str, splits: list[str], options: dict,
            log: Callable = print) -> tuple[dict, list[dict]]:
    """List (or reuse the listing), convert every shard, write the manifest: (manifest, entries)."""
    init_ray()
    items, classes = plan(source, out, splits, options["images_per_shard"], options["seed"],
                          log=log)
    entries = convert(items, out, classes, options, log)
    return write_manifest(out, entries, classes, options), entries
