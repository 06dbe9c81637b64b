"""`benchmarks/run.py` end to end on a few generated JPEGs: it runs from a fresh clone, every
pipeline yields every image, and its last line is the JSON the README documents."""
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.run import generate_jpegs

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_benchmark_prints_its_figures(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    generate_jpegs(images, count=12)
    grid = tmp_path / "crops.png"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--images",
                           str(images), "--repeats", "1", "--grid", str(grid)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stdout
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["images"] == 12 and figures["repeats"] == 1
    for name in ("baseline", "ours", "shards"):
        assert figures[f"{name}_images_per_s_224"] > 0 and figures[f"{name}_images_per_s_128"] > 0
    assert figures["pipeline_speedup"] == figures["speedup_shards_224"] > 0
    # Files decoded at full size must give the baseline's crops pixel for pixel.
    assert figures["crop_mean_abs_diff_plain_224"] == 0.0
    assert set(figures["not_measured"]) == {"ray_overhead_ratio", "ckpt_stall_s"}
    assert grid.stat().st_size > 10_000
