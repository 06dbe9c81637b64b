"""`benchmarks/run.py` end to end on a few generated JPEGs: it runs from a fresh clone, every
pipeline yields every image, and its last line is the JSON the README documents."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from benchmarks.ckpt_step_times import classify
from benchmarks.ray_data_vs_loader import decode_batch
from benchmarks.images import generate_jpegs
from rn50.data import turbo_decode

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_benchmark_prints_its_figures(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    generate_jpegs(images, count=12)
    grid = tmp_path / "crops.png"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--images",
                           str(images), "--repeats", "1", "--grid", str(grid)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stdout
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["images"] == 12 and figures["repeats"] == 1
    for name in ("baseline", "ours", "ours_whole", "shards"):
        assert figures[f"{name}_images_per_s_224"] > 0 and figures[f"{name}_images_per_s_128"] > 0
    assert figures["pipeline_speedup"] == figures["speedup_shards_224"] > 0
    # Ours draws the baseline's crop boxes: only decoding and resampling differ, by ~1/255.
    assert 0 < figures["crop_mean_abs_diff_224"] < 3 and figures["turbo_decoded_fraction"] == 1
    assert figures["region_decoder_built"] == int(turbo_decode.rn50_jpeg_region is not None)
    assert set(figures["not_measured"]) == {"ray_overhead_ratio", "ckpt_stall_s",
                                            "ckpt_step_stall_s", "ray_data_vs_loader_ratio"}
    assert grid.stat().st_size > 10_000


def test_step_classes_follow_the_upload_timestamps():
    steps = [{"start_s": 0.0, "end_s": 1.0, "saves": False},
             {"start_s": 1.0, "end_s": 2.5, "saves": True},    # the save: 0.5 s over a step
             {"start_s": 2.5, "end_s": 3.7, "saves": False},   # upload (2.5-4.0) in flight
             {"start_s": 3.7, "end_s": 4.7, "saves": False},   # overlaps its last 0.3 s
             {"start_s": 4.7, "end_s": 5.7, "saves": False}]
    figures = classify(steps, [(2.5, 4.0)])
    assert (figures["steps_saving"], figures["steps_upload_in_flight"], figures["steps_clean"]) \
        == (1, 2, 2)
    assert abs(figures["ckpt_step_stall_s"] - 0.5) < 1e-9
    assert abs(figures["upload_step_ratio"] - 1.1) < 1e-9
    assert figures["upload_s_mean"] == 1.5


def test_ray_data_decode_batch_matches_the_shard_rows(tmp_path):
    paths = generate_jpegs(tmp_path, count=3)
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    batch = pa.table({"image": images + [{"bytes": b"not a jpeg", "path": "bad.jpg"}],
                      "label": [4, 5, 6, 7]})
    out = decode_batch(batch, crop_px=64)
    assert out["image"].shape == (3, 3, 64, 64) and out["image"].dtype.name == "uint8"
    assert out["label"].tolist() == [4, 5, 6]  # the corrupt row is skipped, not crashed on


def test_every_cross_benchmark_import_resolves():
    # Imports inside functions only fail when the opt-in path runs (run.py --ray-overhead once
    # imported a helper that had moved); check every `from benchmarks.x import y` statically.
    import ast
    import importlib
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{script.name}: {node.module}.{alias.name}"


def test_augmentation_benchmark_writes_its_grid_and_figures(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    generate_jpegs(images, count=4)
    out, grid = tmp_path / "augmentations.json", tmp_path / "augmentations.png"
    done = subprocess.run([sys.executable, "-m", "benchmarks.augmentations",
                           "--images", str(images), "--repeats", "1", "--grid-images", "3",
                           "--crop-px", "64", "--out", str(out), "--grid", str(grid)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["images"] == 4 and figures["machine"]["cpus"] == os.cpu_count()
    assert figures["command"].startswith("python -m benchmarks.augmentations --images")
    rows = figures["per_image"]
    assert set(rows) == {"none", "trivialaugment_wide", "randaugment", "autoaugment",
                         "random_erasing", "all"} and rows["none"]["ratio_vs_none"] == 1.0
    assert all(row["images_per_s"] > 0 and row["transform_only_images_per_s"] > 0
               for row in rows.values())
    assert figures["figures"]["mixup_ms_per_batch_64_cpu"] > 0
    assert figures["figures"]["trivialaugment_wide_ratio_vs_none"] == \
        rows["trivialaugment_wide"]["ratio_vs_none"]
    with Image.open(grid) as picture:  # 8 rows (none ... all) of 3 tiles of 64 px
        assert picture.size == (6 + 3 * (64 + 6), 8 * (16 + 64 + 14 + 6))


def test_augmentation_grid_rows_show_each_augmentation(tmp_path):
    from benchmarks.augmentations import GRID_ROWS, grid_rows
    sources = [path.read_bytes() for path in generate_jpegs(tmp_path, count=3)]
    rows = grid_rows(sources, ["a", "b", "c"], crop_px=48)
    assert list(rows) == list(GRID_ROWS)
    plain = rows["none"][0]
    for name, (batch, captions) in rows.items():
        assert batch.shape == (3, 3, 48, 48) and batch.dtype == torch.uint8 and len(captions) == 3
        if name != "none":  # every augmentation changes what the model sees
            assert not torch.equal(batch, plain), name
    assert rows["none"][1] == ["a", "b", "c"]
    assert all(" + " in caption for caption in rows["cutmix"][1])  # two labels, two weights
