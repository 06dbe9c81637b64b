"""Exports of a trained model for use outside this project.

    python -m rn50.export torchvision --checkpoint URI --out exports/   # resnet50.pth + .json
    python -m rn50.export onnx        --checkpoint URI --out exports/   # model.onnx
    python -m rn50.export mlflow      --checkpoint URI --out exports/   # mlflow_model/
    python -m rn50.export space       --checkpoint URI --out exports/   # space/ (HF Spaces)
    python -m rn50.export all         --checkpoint URI --out exports/

URI is whatever `rn50.artifacts.load_model` takes (checkpoint or run dir, local or s3://, or an
MLflow model URI); `--ema` exports the EMA weights. Every export carries the readable class names
(and, for ImageNet classes, their wnids as `class_wnids`): in a JSON sidecar, the ONNX metadata,
the MLflow model's artifacts, the Space's model.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from rn50.serve import inference
from rn50.serve.artifacts import (LATEST_HELP, USER_ERRORS, ArtifactError, LoadedModel,
                                  load_model)
from rn50.serve.inference import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("torchvision", "onnx", "mlflow", "space")
SPACE_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1", "gradio==6.31.0", "grad-cam==1.5.7",
                      "numpy", "pillow")


def model_card(loaded: LoadedModel) -> dict:
    """What a consumer needs besides the weights: classes, input size and normalization."""
    classifier = loaded.classifier
    return {"arch": loaded.arch, "num_classes": len(classifier.class_names),
            "class_names": classifier.class_names, "class_wnids": classifier.class_wnids,
            "resize_px": classifier.resize_px,
            "crop_px": classifier.crop_px, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "input": "float32 [N, 3, crop_px, crop_px]: RGB / 255, minus mean, divided by std",
            "source": loaded.source, "weights": loaded.weights}


def _plain_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    if loaded.arch != "resnet50":
        raise ArtifactError(f"a {loaded.arch} is not a torchvision resnet50 (its stem and "
                            "shortcuts differ), so it has no torchvision state_dict or Space "
                            "export: use the onnx or mlflow export instead")
    # The live model's tensors, not the checkpoint's: loading EMA weights (all float32) into it
    # already restored torchvision's dtypes (int64 num_batches_tracked).
    return {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}


def export_torchvision(loaded: LoadedModel, out_dir: Path) -> Path:
    """`resnet50.pth`: a state_dict for torchvision.models.resnet50(num_classes=N), + `.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "resnet50.pth"
    torch.save(_plain_state_dict(loaded), path)
    path.with_suffix(".json").write_text(json.dumps(model_card(loaded), indent=2))
    return path


def export_onnx(loaded: LoadedModel, out_dir: Path, opset: int = 18) -> Path:
    """`model.onnx`: normalized float32 [batch, 3, crop, crop] -> logits; card in metadata."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    crop = loaded.classifier.crop_px
    example = torch.zeros(2, 3, crop, crop)
    model = loaded.model.cpu().eval()
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                      input_names=["images"], output_names=["logits"], external_data=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    proto = onnx.load(str(path))
    for key, value in model_card(loaded).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))
    return path


def export_mlflow(loaded: LoadedModel, out_dir: Path) -> Path:
    """`mlflow_model/`: a pyfunc model (uint8 images in, top-5 names out) with a signature."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    import rn50
    from rn50.serve import serving

    path = out_dir / "mlflow_model"
    if path.exists():
        shutil.rmtree(path)
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta = Path(tmp) / "weights.pt", Path(tmp) / "model.json"
        torch.save({k: v.cpu() for k, v in loaded.model.state_dict().items()}, weights)
        meta.write_text(json.dumps(model_card(loaded)))
        python_model = serving.ImageClassifierModel()
        example = serving.example_input(loaded.classifier.crop_px)
        python_model.classifier = loaded.classifier  # only to infer the output schema
        with warnings.catch_warnings():  # MLflow's hint about int columns and missing values
            warnings.simplefilter("ignore", UserWarning)
            outputs = infer_signature(example, python_model.predict(None, example)).outputs
        del python_model.classifier
        # Any image size is accepted (predict resizes and crops as validation does).
        signature = ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, -1, -1))]),
                                   outputs)
        mlflow.pyfunc.save_model(
            str(path), python_model=python_model, signature=signature, input_example=example,
            artifacts={"weights": str(weights), "meta": str(meta)},
            code_paths=[str(Path(rn50.__file__).parent)],
            pip_requirements=["torch==2.14.1", "torchvision==0.29.1",
                              f"mlflow=={mlflow.__version__}", "pyyaml>=6", "pillow>=10",
                              "numpy>=1.26", "pandas"])
    return path


def export_space(loaded: LoadedModel, out_dir: Path) -> Path:
    """`space/`: a Hugging Face Spaces (Gradio SDK) folder: app.py, weights, requirements."""
    space = out_dir / "space"
    space.mkdir(parents=True, exist_ok=True)
    torch.save(_plain_state_dict(loaded), space / "weights.pt")
    card = {**model_card(loaded), "title": f"ResNet-50 ({len(loaded.classifier.class_names)} "
                                           "classes, trained from scratch)"}
    (space / "model.json").write_text(json.dumps(card, indent=2))
    shutil.copyfile(inference.__file__, space / "app.py")
    (space / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")
    (space / "README.md").write_text(_space_readme(card["title"]))
    return space


def _space_readme(title: str) -> str:
    return ("---\n"
            f"title: {title}\n"
            "sdk: gradio\n"
            "sdk_version: 6.31.0\n"
            "app_file: app.py\n"
            "pinned: false\n"
            "---\n\n"
            f"# {title}\n\nUpload an image to see the five most likely classes and a Grad-CAM "
            "heatmap of where the model looked. Run locally with `pip install -r "
            "requirements.txt && python app.py`.\n")


EXPORTERS = {"torchvision": export_torchvision, "onnx": export_onnx, "mlflow": export_mlflow,
             "space": export_space}


def export(loaded: LoadedModel, fmt: str, out_dir: str | Path) -> list[Path]:
    """Run one export (`fmt` in FORMATS) or all of them; return what was written."""
    names = FORMATS if fmt == "all" else (fmt,)
    return [EXPORTERS[name](loaded, Path(out_dir)) for name in names]


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m rn50.export FORMAT --checkpoint URI --out DIR [--ema]`."""
    parser = argparse.ArgumentParser(prog="python -m rn50.export", description=__doc__)
    parser.add_argument("format", choices=[*FORMATS, "all"])
    parser.add_argument("--checkpoint", required=True, help="checkpoint/run dir or MLflow URI")
    parser.add_argument("--out", default="exports", help="output directory")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--latest", action="store_true", help=LATEST_HELP)
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI for runs:/ URIs")
    args = parser.parse_args(argv)
    from rn50.io.tracking import resolve_tracking_uri
    try:
        loaded = load_model(args.checkpoint, args.ema, latest=args.latest,
                            tracking_uri=resolve_tracking_uri(args.tracking_uri))
        for path in export(loaded, args.format, args.out):
            print(f"wrote {path}")
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
