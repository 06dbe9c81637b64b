"""Sweep report pieces render from trial records (no Ray, no MLflow server)."""
import io

from PIL import Image

from rn50.distributed.sweep_report import TrialRecord, curves_png, plane_png, trials_table

RECORDS = [
    TrialRecord("t1", {"optim.lr": 0.01, "optim.weight_decay": 1e-5}, "completed",
                [(0, 40.0), (1, 70.0)]),
    TrialRecord("t2", {"optim.lr": 0.3, "optim.weight_decay": 1e-3}, "stopped_by_asha",
                [(0, 20.0)]),
    TrialRecord("t3", {"optim.lr": 0.1, "optim.weight_decay": 1e-4}, "errored", []),
]


def test_pngs_are_real_images():
    for png in (plane_png(RECORDS, "val_top1", "max"), curves_png(RECORDS, "val_top1")):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.width > 300


def test_table_has_one_row_per_trial_with_best_metric():
    table = trials_table(RECORDS, "val_top1", "max")
    assert table["trial_id"] == ["t1", "t2", "t3"]
    assert table["best_val_top1"] == [70.0, 20.0, None]
    assert table["status"] == ["completed", "stopped_by_asha", "errored"]
    assert table["optim.lr"] == [0.01, 0.3, 0.1]


def test_best_respects_mode():
    assert RECORDS[0].best("min") == 40.0 and RECORDS[2].best("max") is None
