"""The RESULT line gives every path in one form: an absolute local path or a storage URI, never
one relative to the folder the job happened to start in (`./runs/...` beside `/abs/...`)."""
import os

from rn50.io import checkpoints as ckpt
from rn50.distributed.driver import _best_of_run
from rn50.io import storage


def test_a_relative_storage_gives_an_absolute_best_checkpoint(tmp_path, monkeypatch):
    """`--storage ./runs` (the local default): the best checkpoint is named by its absolute path,
    as Ray names the final one."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "demo-1" / ckpt.BEST_DIR / "checkpoint_2026-01-02_03-04-05.678901"
    ckpt.save_checkpoint(folder, {"epoch": 2}, {"epoch": 2, "val_top1": 41.5})
    best = _best_of_run("./runs", "demo-1", "val_top1")
    assert best["best_checkpoint"] == str(folder)
    assert (best["best_val_top1"], best["best_epoch"]) == (41.5, 2)


def test_absolute_keeps_uris_and_anchors_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.absolute("./runs/a") == str(tmp_path / "runs" / "a")
    assert storage.absolute("~/runs") == str(tmp_path / "home" / "runs")
    assert storage.absolute("/data/runs") == "/data/runs"
    for uri in ("s3://bucket/runs/a", "runs:/0123abcd/model", "models:/rn50/3", ""):
        assert storage.absolute(uri) == uri


def test_ray_paths_take_the_storage_form(tmp_path, monkeypatch):
    """Ray gives an S3 checkpoint as bucket/key, a local one as a path."""
    monkeypatch.chdir(tmp_path)
    assert storage.from_ray_path("bucket/runs/a/checkpoint_1", "s3://bucket/runs") == \
        "s3://bucket/runs/a/checkpoint_1"
    assert storage.from_ray_path("runs/a/checkpoint_1", "./runs") == \
        os.path.join(tmp_path, "runs", "a", "checkpoint_1")
    assert storage.from_ray_path("", "./runs") == ""
