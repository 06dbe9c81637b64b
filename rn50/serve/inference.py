"""Standalone inference: upload checks, preprocessing, top-5, Grad-CAM overlays and the Gradio app.

This file imports nothing from rn50 on purpose: `python -m rn50.export space` copies it verbatim
as a Hugging Face Space's `app.py`, where `main()` loads `weights.pt` (a torchvision `resnet50`
state_dict) and `model.json` (class names, crop sizes) from the folder it sits in. The demo
(`python -m rn50.demo`) and the misclassification gallery use the same functions, so what a
Space shows is what the demo shows.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 40_000_000  # ~ a 7,700 x 5,200 photo; larger uploads are refused, not decoded
DISPLAY_PX = 256  # overlays of small crops (32 px digits) are upscaled to at least this side
CAM_MIN_SIDE = 4  # Grad-CAM needs a feature map of at least 4x4 to say "where"
_STAGES = (("layer4", 32), ("layer3", 16), ("layer2", 8), ("layer1", 4))


class UploadError(ValueError):
    """An upload that cannot be classified; the message is shown to the user as is."""


@dataclass
class Classifier:
    """A model taking normalized float NCHW input, with its class names and val preprocessing;
    `class_wnids` holds each class's ImageNet WordNet id when the classes are ImageNet's."""
    model: nn.Module
    class_names: list[str]
    resize_px: int
    crop_px: int
    class_wnids: list[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize the shorter side, center-crop (as validation does): uint8 [3, crop, crop]."""
        steps = T.Compose([T.Resize(self.resize_px, interpolation=T.InterpolationMode.BILINEAR,
                                    antialias=True), T.CenterCrop(self.crop_px), T.PILToTensor()])
        return steps(image.convert("RGB"))

    @torch.no_grad()
    def probabilities(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [N, classes] for a uint8 batch [N, 3, H, W]."""
        self.model.eval()
        return self.model(normalize(batch_uint8)).float().softmax(dim=1)

    def explain(self, image: Image.Image, k: int = 5) -> tuple[dict[str, float], np.ndarray]:
        """Top-k {class name: probability} and a Grad-CAM overlay (uint8 HWC) of the top class."""
        batch = self.preprocess(image)[None]
        probs = self.probabilities(batch)[0]
        top = probs.topk(min(k, probs.numel()))
        labels = {self.class_names[i]: float(p) for p, i in zip(top.values, top.indices.tolist())}
        with self._lock:  # Grad-CAM hooks the shared model: one explanation at a time
            heatmap = gradcam(self.model, normalize(batch), [int(top.indices[0])])[0]
        return labels, upscale(overlay(batch[0], heatmap), DISPLAY_PX)


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 (x/255 - mean) / std, as training fed the model."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch_uint8.float() / 255.0 - mean.to(batch_uint8.device)) / std.to(batch_uint8.device)


def open_upload(path: str | os.PathLike) -> tuple[Image.Image, list[str]]:
    """Decode an uploaded file to RGB, or raise UploadError saying what is wrong with it."""
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"The file is {size / 2**20:.0f} MB; upload an image under "
                          f"{MAX_UPLOAD_BYTES // 2**20} MB.")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        raise UploadError(_too_big_message()) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UploadError("This file is not an image Pillow can read; upload a JPEG, PNG, WebP, "
                          "BMP or GIF.") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UploadError(_too_big_message(width, height))
    try:
        image = ImageOps.exif_transpose(image)  # phone photos are stored sideways + a rotation tag
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise UploadError(f"The image is damaged or truncated ({err}); upload it again.") from None
    notes = [] if image.mode == "RGB" else [_mode_note(image.mode)]
    return _to_rgb(image), notes


def _too_big_message(width: int = 0, height: int = 0) -> str:
    dims = f" ({width} x {height})" if width else ""
    return (f"The image{dims} is larger than {MAX_PIXELS // 1_000_000} megapixels; downscale it "
            "and upload it again.")


def _mode_note(mode: str) -> str:
    kinds = {"L": "grayscale", "LA": "grayscale with alpha", "1": "black-and-white",
             "CMYK": "CMYK", "P": "palette", "RGBA": "RGBA", "I;16": "16-bit grayscale",
             "I": "32-bit grayscale", "F": "floating-point grayscale", "YCbCr": "YCbCr"}
    return (f"The image was {kinds.get(mode, mode)} ({mode}); it was converted to RGB, which is "
            "what the model was trained on.")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs: scale to 8 bits, not clip
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def cam_layer(model: nn.Module, input_px: int) -> nn.Module:
    """The deepest ResNet stage whose feature map is still >= 4x4 for this input size."""
    for name, stride in _STAGES:
        if input_px // stride >= CAM_MIN_SIDE or name == "layer1":
            return getattr(model, name)[-1]
    raise AssertionError("unreachable")


def gradcam(model: nn.Module, batch: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM heatmaps in [0, 1], [N, H, W] at the input's size, one per (image, class)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = cam_layer(model, batch.shape[-1])
    # Gradients are needed even when the caller runs under no_grad (e.g. an eval loop).
    with torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in classes])


def overlay(image_uint8: torch.Tensor, heatmap: np.ndarray) -> np.ndarray:
    """A jet-coloured heatmap blended onto a uint8 [3, H, W] image: uint8 [H, W, 3]."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = image_uint8.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.55)


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge an HWC uint8 image (nearest neighbour, pixels stay visible) to >= min_side."""
    height, width = image.shape[:2]
    factor = -(-min_side // min(height, width))
    if factor <= 1:
        return image
    return np.ascontiguousarray(image.repeat(factor, axis=0).repeat(factor, axis=1))


def classify_upload(classifier: Classifier, path: str | None):
    """Gradio handler: (top-5 label dict, overlay, notes markdown); bad uploads raise gr.Error."""
    import gradio as gr

    if not path:
        raise gr.Error("Upload an image first (JPEG, PNG, WebP, BMP or GIF).")
    try:
        image, notes = open_upload(path)
    except UploadError as err:
        raise gr.Error(str(err)) from None
    labels, heatmap = classifier.explain(image)
    return labels, heatmap, "\n".join(f"- {note}" for note in notes)


def build_app(classifier: Classifier, title: str = "ResNet-50 classifier"):
    """The Gradio Blocks app: upload an image, see the top-5 classes and a Grad-CAM overlay."""
    import gradio as gr

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nUpload an image: the model's five most likely classes among "
                    f"{len(classifier.class_names)}, and a Grad-CAM heatmap of where it looked "
                    "for the top one (red = most important).")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", file_types=["image"], type="filepath",
                                 elem_id="upload")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                notes = gr.Markdown(elem_id="notes")
            with gr.Column():
                labels = gr.Label(num_top_classes=5, label="Top-5", elem_id="top5")
                heatmap = gr.Image(label="Grad-CAM", type="numpy", format="png",
                                   interactive=False, elem_id="gradcam")
        outputs = [labels, heatmap, notes]
        button.click(lambda path: classify_upload(classifier, path), upload, outputs,
                     api_name="classify")
        upload.upload(lambda path: classify_upload(classifier, path), upload, outputs,
                      api_name=False)
    return app


def load_space_classifier(folder: str | os.PathLike) -> Classifier:
    """A Classifier from an exported folder: `weights.pt` (torchvision resnet50) + `model.json`."""
    from torchvision.models import resnet50

    folder = Path(folder)
    meta = json.loads((folder / "model.json").read_text())
    model = resnet50(weights=None, num_classes=len(meta["class_names"]))
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return Classifier(model.eval(), meta["class_names"], meta["resize_px"], meta["crop_px"],
                      meta.get("class_wnids"))


def main() -> None:
    """Hugging Face Space entrypoint: serve the model stored beside this file."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    classifier = load_space_classifier(Path(__file__).resolve().parent)
    meta = json.loads((Path(__file__).resolve().parent / "model.json").read_text())
    build_app(classifier, meta.get("title", "ResNet-50 classifier")).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        max_file_size=MAX_UPLOAD_BYTES)


if __name__ == "__main__":
    main()
