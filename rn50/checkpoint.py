"""Checkpoint files: the whole training state in `state.pt`, plus a `manifest.json` written last.

The manifest lists every file's size and SHA-256. A checkpoint directory without a manifest, or
whose files do not match it, was cut short (a worker died mid-write, an upload broke) and is never
loaded. Loading uses `torch.load(weights_only=True)`, so a checkpoint cannot execute code.

    python -m rn50.checkpoint fingerprint CHECKPOINT_DIR   # SHA-256 of the model weights
    python -m rn50.checkpoint verify CHECKPOINT_DIR
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain tensors/lists (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
            "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])


def save_checkpoint(directory: str | Path, state: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write `state` (tensors, dicts, numbers) and then a manifest with `summary` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    torch.save(state, state_path)
    manifest = {"format_version": FORMAT_VERSION, "summary": summary,
                "files": {STATE_FILE: {"size": state_path.stat().st_size,
                                       "sha256": _sha256_file(state_path)}}}
    # Written last and atomically: its presence means every file above is complete.
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(directory / MANIFEST_FILE)
    return directory


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Return the manifest if every file matches it; raise CheckpointError saying what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {MANIFEST_FILE}: it was not finished")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {directory} has an unreadable manifest: {err}") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(f"checkpoint {directory}: {name} is {path.stat().st_size} bytes, "
                                  f"the manifest says {expected['size']} (truncated?)")
        if _sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: {name} does not match its SHA-256 "
                                  "(altered or corrupted)")
    return manifest


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint's state dict (weights_only, so no code runs)."""
    verify_checkpoint(directory)
    try:
        return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise CheckpointError(f"checkpoint {directory} could not be loaded: {err}") from None


def training_state(model, optimizer, scheduler, ema, epoch: int, steps_done: int,
                   config_dict: dict, extra: dict | None = None) -> dict[str, Any]:
    """Everything a bit-exact resume needs, after `steps_done` optimizer steps of `epoch`."""
    from rn50.model import unwrap
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
            "epoch": epoch, "steps_done": steps_done, "config": config_dict,
            "rng": capture_rng_state(), **(extra or {})}


def apply_training_state(state: dict[str, Any], model, optimizer, scheduler, ema,
                         steps_per_epoch: int) -> tuple[int, int]:
    """Load `state` into the live objects; return (epoch, step) to continue from."""
    from rn50.model import unwrap
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    restore_rng_state(state["rng"])
    steps_done = state.get("steps_done", steps_per_epoch)
    if steps_done >= steps_per_epoch:
        return state["epoch"] + 1, 0
    return state["epoch"], steps_done


def fingerprint_weights(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """CLI: `fingerprint DIR` prints the weights' SHA-256; `verify DIR` checks the manifest."""
    parser = argparse.ArgumentParser(prog="python -m rn50.checkpoint")
    parser.add_argument("command", choices=["fingerprint", "verify"])
    parser.add_argument("checkpoint", help="checkpoint directory (holds state.pt and manifest.json)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            summary = verify_checkpoint(args.checkpoint)["summary"]
            print(f"OK {args.checkpoint} {json.dumps(summary)}")
        else:
            print(fingerprint_weights(load_checkpoint(args.checkpoint)["model"]))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
