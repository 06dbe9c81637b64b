"""Exports reloaded the way their users load them, compared with the original model's outputs."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from rn50.serve import demo
from rn50.serve import inference
from rn50.serve.artifacts import ArtifactError, load_model
from rn50.serve.export import export, main
from rn50.serve.inference import load_space_classifier
from tests.model_helpers import digits_config, write_checkpoint

NAMES = [f"digit {d}" for d in range(10)]


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    root = module_tmp
    config = digits_config(root / "digits", "train.ema_decay=0.5")
    return write_checkpoint(root / "checkpoint_0", config, ema=True, extra={"class_names": NAMES})


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint), ema=True)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(inference.normalize(images))


def test_torchvision_state_dict_loads_into_a_plain_resnet50(tmp_path, loaded, images):
    (path,) = export(loaded, "torchvision", tmp_path)
    plain = torchvision.models.resnet50(num_classes=10)
    plain.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, every shape
    assert torch.allclose(_logits(plain, images), _logits(loaded.model, images), atol=1e-5)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["class_names"] == NAMES and card["weights"] == "ema" and card["crop_px"] == 32


def test_resnet50d_has_no_torchvision_export_and_says_what_to_use(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "d", digits_config(tmp_path, "model.arch=resnet50d"))
    loaded_d = load_model(str(checkpoint))
    with pytest.raises(ArtifactError, match="not a torchvision resnet50.*onnx or mlflow"):
        export(loaded_d, "torchvision", tmp_path / "out")
    with pytest.raises(ArtifactError, match="not a torchvision resnet50"):
        export(loaded_d, "space", tmp_path / "out")


def test_onnx_export_matches_the_model_and_carries_the_class_names(tmp_path, loaded, images):
    import onnx
    import onnxruntime

    (path,) = export(loaded, "onnx", tmp_path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": inference.normalize(images).numpy()})[0]
    assert got.shape == (3, 10)  # exported with batch 2: the batch axis is dynamic
    np.testing.assert_allclose(got, _logits(loaded.model, images).numpy(), atol=1e-4)
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert metadata["class_names"] == NAMES and metadata["mean"][0] == 0.485


def test_mlflow_pyfunc_takes_uint8_images_of_any_size_and_names_the_top5(tmp_path, loaded,
                                                                          images):
    import mlflow.pyfunc

    (path,) = export(loaded, "mlflow", tmp_path)
    served = mlflow.pyfunc.load_model(str(path))
    assert served.metadata.get_input_schema().inputs[0].shape == (-1, 3, -1, -1)
    table = served.predict(images.numpy())
    probs = _logits(loaded.model, images).softmax(dim=1)
    assert list(table["class_index"]) == probs.argmax(dim=1).tolist()
    assert list(table["label"]) == [NAMES[i] for i in probs.argmax(dim=1).tolist()]
    np.testing.assert_allclose(table["probability"], probs.max(dim=1).values.numpy(), rtol=1e-4)
    assert all(len(row) == 5 for row in table["top5_labels"])
    bigger = torch.nn.functional.interpolate(images.float(), size=(48, 40)).round().byte()
    assert len(served.predict(bigger.numpy())) == 3  # resized and cropped, not refused


def test_space_folder_runs_on_its_own(tmp_path, loaded, images):
    (space,) = export(loaded, "space", tmp_path)
    assert {p.name for p in space.iterdir()} >= {"app.py", "weights.pt", "model.json",
                                                 "requirements.txt", "README.md"}
    assert (space / "app.py").read_text() == open(inference.__file__).read()
    requirements = (space / "requirements.txt").read_text()
    assert "gradio==" in requirements and "grad-cam==" in requirements
    assert "sdk: gradio" in (space / "README.md").read_text()
    classifier = load_space_classifier(space)
    assert classifier.class_names == NAMES
    assert torch.allclose(_logits(classifier.model, images), _logits(loaded.model, images),
                          atol=1e-5)
    # app.py must not need this project: import it from the folder in a fresh interpreter.
    code = ("import sys; sys.modules['rn50'] = None; sys.path.insert(0, '.'); import app; "
            "c = app.load_space_classifier('.'); print(len(c.class_names))")
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=space, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "10", done.stderr


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    assert main(["onnx", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert demo.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "MLflow model URI" in capsys.readouterr().err


def test_demo_cli_exports_a_space(tmp_path, checkpoint):
    assert demo.main(["--checkpoint", str(checkpoint), "--export-space", str(tmp_path)]) == 0
    assert load_space_classifier(tmp_path / "space").class_names == NAMES
