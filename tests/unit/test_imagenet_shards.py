"""ImageNet -> parquet shards without Ray: sources, shuffle plan, shard writing, resume."""
import io
import json

import pytest
from PIL import Image

from rn50.data.datasets import ParquetDataset
from rn50.data.imagenet_shards import plan_shards, shrink, write_shard
from rn50.io.storage import filesystem_and_path
from rn50.data.imagenet_sources import Record, list_source, read_record
from tests.ilsvrc_fixture import WNIDS, make_hf_parquet, make_ilsvrc, make_tars


@pytest.fixture(scope="module")
def ilsvrc(module_tmp):
    root = module_tmp
    labels = make_ilsvrc(root / "folders")
    make_tars(root / "folders", root / "tars")
    make_hf_parquet(root / "folders", labels, root / "hf")
    return root, labels


def _contents(source, split, classes=None):
    records, classes = list_source(str(source), split, classes)
    fs, _ = filesystem_and_path(str(source))
    handles = {}
    return {r.name: (classes[r.label], read_record(fs, r, handles)) for r in records}, classes


def test_tars_and_folders_list_the_same_images_and_labels(ilsvrc):
    root, labels = ilsvrc
    for split in ("train", "val"):
        from_folders, classes = _contents(root / "folders", split, WNIDS)
        from_tars, tar_classes = _contents(root / "tars", split, WNIDS)
        from_parquet, parquet_classes = _contents(root / "hf", split)  # names from HF metadata
        assert classes == tar_classes == parquet_classes == WNIDS
        # Same names, same labels, byte-identical images.
        assert from_folders == from_tars == from_parquet
        assert {name: wnid for name, (wnid, _) in from_tars.items()} == \
            {n: w for n, w in labels.items() if (split == "val") == n.startswith("ILSVRC")}


def test_the_plan_is_a_seeded_shuffle_covering_every_image_once(ilsvrc):
    records, _ = list_source(str(ilsvrc[0] / "folders"), "train")
    items = plan_shards(records, "train", per_shard=5, seed=1)
    names = [r["name"] for item in items for r in json.loads(item["records"])]
    assert sorted(names) == sorted(r.name for r in records) and len(items) == 5  # 24 / 5
    assert names != [r.name for r in records], "not shuffled"
    assert items == plan_shards(records, "train", per_shard=5, seed=1)
    assert items[-1]["name"] == "train-00004-of-00005.parquet"


def test_shrink_caps_the_shorter_side_and_passes_small_images_through():
    big = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(big, "JPEG")
    small = shrink(big.getvalue(), 64)
    assert Image.open(io.BytesIO(small)).size == (96, 64)
    assert shrink(small, 64) == small and shrink(b"not an image", 64) == b"not an image"


def test_shards_are_readable_verified_and_skipped_when_done(ilsvrc, tmp_path):
    source, out = str(ilsvrc[0] / "tars"), str(tmp_path / "out")
    records, classes = list_source(source, "train")
    options = {"source": source, "max_px": 64, "images_per_shard": 10, "seed": 0}
    items = plan_shards(records, "train", 10, 0)
    entries = [write_shard(item, out, classes, options) for item in items]
    assert [e["skipped"] for e in entries] == [False] * 3 and sum(e["rows"] for e in entries) == 24
    dataset = ParquetDataset(out, "train")
    assert dataset.classes == WNIDS and len(dataset) == 24
    assert all(min(image.shape[1:]) <= 64 for image, _ in (dataset[i] for i in range(24)))
    # Idempotent: a rerun only checks; a damaged shard is rewritten, the others are skipped.
    shard = tmp_path / "out" / "train" / items[1]["name"]
    shard.write_bytes(shard.read_bytes()[:-10])
    again = [write_shard(item, out, classes, options) for item in items]
    assert [e["skipped"] for e in again] == [True, False, True]
    assert again[1]["sha256"] == entries[1]["sha256"]  # the rewrite is byte-identical


def test_parquet_rows_are_shuffled_by_row_group_then_within_each_shard(ilsvrc):
    records, _ = list_source(str(ilsvrc[0] / "hf"), "train")
    items = plan_shards(records, "train", per_shard=8, seed=0)
    shards = [[Record(**r) for r in json.loads(item["records"])] for item in items]
    assert sorted(r.name for shard in shards for r in shard) == sorted(r.name for r in records)
    for shard in shards:  # 8 rows from at most 3 row groups of 4 (a group may straddle shards)
        assert len({(r.source, r.offset) for r in shard}) <= 3
    assert any(len({r.label for r in shard}) > 1 for shard in shards), "classes not mixed"
    assert [r.name for r in shards[0]] != sorted(r.name for r in shards[0]), "rows not mixed"


def test_parquet_source_converts_to_shards_with_the_same_images(ilsvrc, tmp_path):
    source, out = str(ilsvrc[0] / "hf"), str(tmp_path / "out")
    records, classes = list_source(source, "train")
    options = {"source": source, "max_px": 0, "images_per_shard": 10, "seed": 0}
    for item in plan_shards(records, "train", 10, 0):
        write_shard(item, out, classes, options)
    converted, _ = _contents(out, "train")
    original, _ = _contents(source, "train")
    assert converted == original
