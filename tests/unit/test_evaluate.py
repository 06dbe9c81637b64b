"""Evaluation and the misclassification gallery, in one process (no Ray)."""
import io

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from rn50.data.loaders import build_loader
from rn50.core.engine import evaluate as engine_evaluate
from rn50.io.tracking import Tracker
from rn50.serve.evaluate import (EvalSpec, build_parser, evaluate_shard, log_training_gallery,
                                 merge, metrics, prepare, run_evaluation, run_from_args)
from rn50.serve.gallery import (Mistake, collect_mistakes, log_gallery, most_confident,
                                strided_indices)
from tests.model_helpers import digits_config, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    return write_checkpoint(module_tmp / "checkpoint_0", digits_config(module_tmp / "digits"))


@pytest.fixture(scope="module")
def prepared(checkpoint):
    return prepare(EvalSpec(str(checkpoint)))


def test_counts_match_the_training_loops_evaluation(prepared):
    loaded, dataset = prepared
    assert len(dataset) == 96
    loader = build_loader(dataset, 32, rank=0, world_size=1, seed=0, epoch=0, train=False)
    expected = engine_evaluate(loaded.model, loader, torch.device("cpu"))
    got = metrics(evaluate_shard(loaded.model, dataset, batch_size=32))
    assert got["images"] == 96
    for key in ("top1", "top5", "loss"):
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key


def test_shards_are_disjoint_and_add_up_to_the_whole_set(prepared):
    loaded, dataset = prepared
    whole = evaluate_shard(loaded.model, dataset, batch_size=40, gallery_size=5)
    parts = [evaluate_shard(loaded.model, dataset, shard, 3, batch_size=16, gallery_size=5)
             for shard in range(3)]
    assert [p.images for p in parts] == [32, 32, 32]
    merged = merge(parts, gallery_size=5)
    assert (merged.images, merged.top1, merged.top5) == (whole.images, whole.top1, whole.top5)
    assert merged.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)
    assert [m.index for m in merged.mistakes] == [m.index for m in whole.mistakes]


class _Averaged(torch.nn.Module):
    """What flip TTA should compute, written out by hand."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(x) + self.model(torch.flip(x, dims=[3]))) / 2


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(prepared):
    loaded, dataset = prepared
    tta = evaluate_shard(loaded.model, dataset, tta_flip=True)
    manual = evaluate_shard(_Averaged(loaded.model), dataset)
    assert (tta.top1, tta.top5) == (manual.top1, manual.top5)
    assert tta.loss_sum == pytest.approx(manual.loss_sum, rel=1e-5)


def test_most_confident_mistakes_first_and_subsampling_spreads_out():
    found = [Mistake(3, 0, 1, 0.5), Mistake(1, 2, 3, 0.9), Mistake(2, 1, 0, 0.9)]
    assert [m.index for m in most_confident(found, 2)] == [1, 2]
    assert list(strided_indices(10, 4)) == [0, 3, 6, 9]
    assert list(strided_indices(5, 0)) == [0, 1, 2, 3, 4]


def test_evaluation_is_logged_to_mlflow_with_the_gallery(tmp_path, checkpoint, prepared):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = build_parser().parse_args(["--checkpoint", str(checkpoint), "--tracking-uri", tracking,
                                      "--gallery-size", "6", "--experiment", "evals"])
    summary = run_from_args(args)
    client = MlflowClient(tracking)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/top1"] == pytest.approx(summary["top1"])
    assert run.data.metrics["eval/images"] == 96
    assert run.data.params["weights"] == "model" and run.data.params["tta_flip"] == "False"
    png = client.download_artifacts(run.info.run_id, "misclassified.png", str(tmp_path))
    assert Image.open(png).size[0] >= 800

    loaded, dataset = prepared
    path = log_gallery(Tracker(tracking, run.info.run_id), loaded.model, dataset,
                       loaded.classifier.class_names, limit=4, max_samples=50)
    assert path == "misclassified.png"


def test_end_of_training_gallery_lands_in_the_training_run(tmp_path, prepared):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    loaded, _ = prepared
    assert log_training_gallery(Tracker(tracking, run_id), loaded.model, loaded.config,
                                max_samples=40) == "misclassified.png"
    assert [a.path for a in client.list_artifacts(run_id)] == ["misclassified.png"]
    missing = loaded.config.from_dict({**loaded.config.to_dict(), "data": {
        **loaded.config.to_dict()["data"], "dataset": "imagefolder",
        "root": str(tmp_path / "absent")}})
    assert log_training_gallery(Tracker(tracking, run_id), loaded.model, missing) == ""


def test_gallery_shows_the_most_confident_mistakes(prepared):
    loaded, dataset = prepared
    mistakes, scanned = collect_mistakes(loaded.model, dataset, limit=4, max_samples=48)
    assert scanned == 48 and len(mistakes) == 4  # an untrained model gets most of them wrong
    assert all(m.label != m.predicted for m in mistakes)
    assert [m.confidence for m in mistakes] == sorted((m.confidence for m in mistakes),
                                                      reverse=True)


def test_without_mlflow_the_summary_is_returned_only(checkpoint):
    summary = run_evaluation(EvalSpec(str(checkpoint), gallery_size=2))
    assert "mlflow_run_id" not in summary and summary["images"] == 96
    assert 0 <= summary["top1"] <= summary["top5"] <= 100


def test_gallery_png_is_a_real_image(prepared):
    from rn50.serve.gallery import gallery_png
    loaded, dataset = prepared
    png = gallery_png(loaded.model, dataset, loaded.classifier.class_names, limit=3,
                      max_samples=30)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > image.size[1] > 100
