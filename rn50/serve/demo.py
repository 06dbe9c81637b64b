"""The Gradio demo of a trained model: upload an image, see the top-5 classes and a Grad-CAM map.

    python -m rn50.demo --checkpoint runs/demo-.../checkpoint_...   # http://127.0.0.1:7860
    python -m rn50.demo --checkpoint s3://bucket/rn50/run1 --port 8000 --host 0.0.0.0
    python -m rn50.demo --checkpoint runs:/<run id>/model
    python -m rn50.demo --checkpoint URI --export-space space_dir/   # a Hugging Face Space

The port comes from --port, else $GRADIO_SERVER_PORT, else 7860. Gradio's analytics are off.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before gradio is imported: it reads these at import time. No phoning home from a demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from rn50.serve.artifacts import LATEST_HELP, USER_ERRORS, load_model
from rn50.serve.inference import MAX_UPLOAD_BYTES, build_app


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(prog="python -m rn50.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint or run directory (local or s3://) or MLflow model URI")
    parser.add_argument("--ema", action="store_true", help="serve the EMA weights")
    parser.add_argument("--latest", action="store_true", help=LATEST_HELP)
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI for runs:/ URIs")
    parser.add_argument("--export-space", metavar="DIR",
                        help="write a Hugging Face Spaces folder to DIR/space and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve the app (or export it as a Space)."""
    args = build_parser().parse_args(argv)
    from rn50.io.tracking import resolve_tracking_uri
    try:
        loaded = load_model(args.checkpoint, args.ema, latest=args.latest,
                            tracking_uri=resolve_tracking_uri(args.tracking_uri))
        if args.export_space:
            from rn50.serve.export import export_space
            print(f"wrote {export_space(loaded, Path(args.export_space))}")
            return 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    count = len(loaded.classifier.class_names)
    app = build_app(loaded.classifier, f"ResNet-50 demo ({count} classes, {loaded.weights} "
                                       "weights)")
    print(f"[rn50] serving {loaded.source} on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_BYTES,
               show_error=True, footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
