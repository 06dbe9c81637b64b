"""Standalone inference: upload checks, preprocessing parity with training, Grad-CAM, top-5."""
import numpy as np
import pytest
import torch
from PIL import Image

from rn50.serve import inference
from rn50.config import DataConfig, ModelConfig
from rn50.serve.inference import Classifier, UploadError, cam_layer, gradcam, open_upload, overlay
from rn50.core.model import build_model
from rn50.data.transforms import normalize as train_normalize
from rn50.data.transforms import val_transform
from tests.model_helpers import random_image


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 10).eval()
    return Classifier(model, [f"class {i}" for i in range(10)], resize_px=36, crop_px=32)


def test_preprocessing_and_normalization_match_what_training_validated_on(tmp_path, classifier):
    image = Image.open(random_image(tmp_path / "a.png", size=(70, 45)))
    expected = val_transform(DataConfig(val_resize_px=36, val_crop_px=32))(image)
    actual = classifier.preprocess(image)
    assert actual.dtype == torch.uint8 and torch.equal(actual, expected)
    assert torch.allclose(inference.normalize(actual[None]), train_normalize(actual[None]),
                          atol=1e-6)


def test_a_file_that_is_not_an_image_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("certainly not a PNG")
    with pytest.raises(UploadError, match="not an image"):
        open_upload(path)


def test_a_truncated_image_is_refused(tmp_path):
    data = random_image(tmp_path / "full.jpg", size=(200, 200)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])
    with pytest.raises(UploadError, match="damaged or truncated"):
        open_upload(tmp_path / "cut.jpg")


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    path = random_image(tmp_path / "big.png", size=(300, 200))
    monkeypatch.setattr(inference, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(UploadError, match=r"\(300 x 200\) is larger than"):
        open_upload(path)
    monkeypatch.setattr(inference, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(UploadError, match="upload an image under"):
        open_upload(path)


@pytest.mark.parametrize("suffix, mode, word", [(".png", "L", "grayscale"),
                                                (".jpg", "CMYK", "CMYK"),
                                                (".png", "RGBA", "RGBA"),
                                                (".png", "P", "palette")])
def test_other_colour_modes_are_converted_to_rgb_with_a_note(tmp_path, suffix, mode, word):
    image, notes = open_upload(random_image(tmp_path / f"x{suffix}", mode=mode))
    assert image.mode == "RGB" and image.size == (64, 48)
    assert len(notes) == 1 and word in notes[0] and "converted to RGB" in notes[0]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    pixels = np.full((8, 8), 40000, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    image, _ = open_upload(tmp_path / "deep.png")
    assert np.asarray(image)[0, 0].tolist() == [156, 156, 156]  # 40000 / 256


def test_rgb_uploads_need_no_note(tmp_path):
    assert open_upload(random_image(tmp_path / "rgb.jpg"))[1] == []


def test_grad_cam_layer_keeps_a_feature_map_of_at_least_four_by_four(classifier):
    model = classifier.model
    assert cam_layer(model, 224) is model.layer4[-1]
    assert cam_layer(model, 64) is model.layer3[-1]
    assert cam_layer(model, 32) is model.layer2[-1]
    assert cam_layer(model, 8) is model.layer1[-1]


def test_grad_cam_heatmaps_are_normalized_maps_at_input_size(classifier):
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # must still work inside a no_grad caller
        maps = gradcam(classifier.model, inference.normalize(batch), [1, 7])
    assert maps.shape == (2, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0
    blended = overlay(batch[0], maps[0])
    assert blended.shape == (32, 32, 3) and blended.dtype == np.uint8


def test_explain_gives_five_named_classes_and_a_visible_overlay(tmp_path, classifier):
    labels, heatmap = classifier.explain(Image.open(random_image(tmp_path / "a.png")))
    assert len(labels) == 5 and set(labels) <= set(classifier.class_names)
    assert list(labels.values()) == sorted(labels.values(), reverse=True)
    assert 0 < sum(labels.values()) <= 1.0 + 1e-6
    assert heatmap.shape == (256, 256, 3) and heatmap.dtype == np.uint8


def test_upscale_enlarges_small_images_only():
    small = np.zeros((32, 40, 3), dtype=np.uint8)
    assert inference.upscale(small, 256).shape == (256, 320, 3)
    big = np.zeros((300, 300, 3), dtype=np.uint8)
    assert inference.upscale(big, 256) is big
