"""The model a training run logs to MLflow is in MLflow's safe format (a torch.export program,
no pickle to trust when it is loaded), says nothing the user cannot act on when logged, and
round-trips: any batch size, and the same weights for rn50's own loader and exports."""
import logging
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow import MlflowClient

from rn50.config import load_config
from rn50.core.model import build_model
from rn50.io import tracking
from rn50.serve.artifacts import load_model


class _Said(logging.Handler):
    """Every warning MLflow logs, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_logged_model_is_safe_and_takes_any_batch_size(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config("demo", [])
    tracker, _ = tracking.start_or_resume_run(config, uri, str(tmp_path / "runs/demo"), "demo", {})
    run_id = tracker.run_id
    torch.manual_seed(0)
    model = build_model(config.model, config.data.num_classes).eval()
    example = torch.zeros(1, 3, config.data.val_crop_px, config.data.val_crop_px)  # as the driver
    said = _Said()  # MLflow's loggers do not propagate: pytest's caplog would see nothing
    logging.getLogger("mlflow").addHandler(said)
    try:
        tracker.finish(succeeded=True, model=model, example_input=example)
    finally:
        logging.getLogger("mlflow").removeHandler(said)
    assert not [line for line in said.lines if "pickle" in line.lower()], said.lines

    local = MlflowClient(uri).download_artifacts(run_id, "model", str(tmp_path / "model"))
    saved = sorted(path.name for path in (Path(local) / "data").iterdir())
    assert "model.pt2" in saved and "model.pth" not in saved, saved  # pickle's file: model.pth
    mlflow.set_tracking_uri(uri)
    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    images = torch.randn(5, 3, config.data.val_crop_px, config.data.val_crop_px)
    with torch.no_grad():
        expected = model(images)
        assert torch.allclose(logged(images), expected, atol=1e-5)  # a batch of 5, not 2
        assert torch.allclose(logged(images[:1]), expected[:1], atol=1e-5)
        # What rn50.export and the demo load from `runs:/...`: the same network, eager.
        loaded = load_model(f"runs:/{run_id}/model", tracking_uri=uri)
        assert torch.allclose(loaded.model(images), expected, atol=1e-5)
