"""Where benchmark figures live: `benchmarks/results/<name>.json`, each with the command that wrote
it, the machine, the date and the figures. The README cites these files, never bare numbers."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What ran the benchmark: CPU model and count, OS, Python, torch, and the GPU if any."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_result(name: str, figures: dict, argv: list[str] | None = None,
                 path: Path | str | None = None, context: dict | None = None) -> Path:
    """Write `figures` (flat: name -> number) as benchmarks/results/<name>.json (or `path`) with
    the command, machine and date; `context` adds what the figures were measured on."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    # Benchmarks run as modules from the checkout's root (`python -m benchmarks.run`): that puts
    # the checkout's `benchmarks` and `rn50` on the path, with no sys.path edits in the scripts.
    if script.parent == RESULTS_DIR.parent:
        shown = ["-m", f"benchmarks.{script.stem}"]
    else:
        shown = [str(script)]
    record = {"command": " ".join(["python", *shown, *argv[1:]]), "machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "figures": figures,
              **(context or {})}
    path = Path(path) if path else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[benchmarks] wrote {path}", flush=True)
    return path
