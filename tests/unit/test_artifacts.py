"""Loading trained models for inference: checkpoint lookup, verification, EMA, class names."""
import shutil

import pytest
import torch

from rn50.io.checkpoints import CheckpointError, download, find_checkpoint
from rn50.serve.artifacts import ArtifactError, class_names_for, load_model
from rn50.config import load_config
from tests.model_helpers import digits_config, write_checkpoint


@pytest.fixture(scope="module")
def run_dir(module_tmp):
    """A run directory with two finished checkpoints and a newer unfinished one."""
    root = module_tmp
    config = digits_config(root / "digits")
    write_checkpoint(root / "checkpoint_2026-01-01_00-00-00.000000", config, seed=1)
    write_checkpoint(root / "checkpoint_2026-01-02_00-00-00.000000", config, seed=2, ema=True)
    (root / "checkpoint_2026-01-03_00-00-00.000000").mkdir()  # cut short: no manifest
    return root


def test_a_run_directory_resolves_to_its_newest_finished_checkpoint(run_dir):
    newest = run_dir / "checkpoint_2026-01-02_00-00-00.000000"
    assert find_checkpoint(str(run_dir)) == str(newest)
    assert find_checkpoint(str(newest) + "/") == str(newest)
    assert download(str(run_dir)) == newest


def test_a_directory_without_checkpoints_says_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*MLflow model URI"):
        find_checkpoint(str(tmp_path / "nothing"))
    (tmp_path / "empty" / "other").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no finished checkpoint"):
        find_checkpoint(str(tmp_path / "empty"))


def test_a_corrupted_checkpoint_is_refused(tmp_path, run_dir):
    copy = tmp_path / "checkpoint_x"
    shutil.copytree(run_dir / "checkpoint_2026-01-01_00-00-00.000000", copy)
    with open(copy / "state.pt", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(str(copy))


def test_ema_weights_are_loaded_when_asked(run_dir):
    plain, averaged = load_model(str(run_dir)), load_model(str(run_dir), ema=True)
    assert plain.weights == "model" and averaged.weights == "ema"
    difference = averaged.model.fc.bias - plain.model.fc.bias
    assert torch.allclose(difference, torch.ones(10))
    assert averaged.model.bn1.num_batches_tracked.dtype == torch.int64
    assert not averaged.model.training
    assert plain.classifier.class_names == [str(d) for d in range(10)]
    assert (plain.classifier.resize_px, plain.classifier.crop_px) == (32, 32)


def test_asking_for_ema_weights_a_checkpoint_lacks_is_a_clear_error(run_dir):
    with pytest.raises(ArtifactError, match="no EMA weights.*drop the EMA option"):
        load_model(str(run_dir / "checkpoint_2026-01-01_00-00-00.000000"), ema=True)
    with pytest.raises(ArtifactError, match="only in checkpoints"):
        load_model("runs:/0123456789abcdef/model", ema=True)


def test_overrides_change_the_data_config(run_dir):
    loaded = load_model(str(run_dir), overrides=["data.val_crop_px=24"])
    assert loaded.config.data.val_crop_px == 24 and loaded.classifier.crop_px == 24


def test_class_names_come_from_the_checkpoint_first(tmp_path):
    config = digits_config(tmp_path)
    names = [f"digit {d}" for d in range(10)]
    assert class_names_for(config, {"class_names": names}) == names
    assert class_names_for(config) == [str(d) for d in range(10)]


def test_class_names_of_imagenette_imagenet_and_image_folders(tmp_path):
    imagenette = load_config("imagenette", [f"data.root={tmp_path}"])
    assert class_names_for(imagenette)[:3] == ["tench", "English springer", "cassette player"]
    imagenet = load_config("imagenet_90ep", [f"data.root={tmp_path / 'absent'}"])
    names = class_names_for(imagenet)
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    for name in ("cats", "dogs", "n01440764"):
        (tmp_path / "folder" / "train" / name).mkdir(parents=True)
    folder = load_config("demo", ["data.dataset=imagefolder", f"data.root={tmp_path / 'folder'}",
                                  "data.num_classes=3"])
    assert class_names_for(folder) == ["cats", "dogs", "tench"]
    wrong_count = load_config("demo", ["data.dataset=imagefolder", "data.num_classes=5",
                                       f"data.root={tmp_path / 'folder'}"])
    assert class_names_for(wrong_count) == ["0", "1", "2", "3", "4"]
