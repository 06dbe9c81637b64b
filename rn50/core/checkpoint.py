"""Checkpoint files: the whole training state in `state.pt`, plus a `manifest.json` written last.

The manifest lists every file's size and SHA-256. A checkpoint directory without a manifest, or
whose files do not match it, was cut short (a worker died mid-write, an upload broke) and is never
loaded. Loading uses `torch.load(weights_only=True)`, so a checkpoint cannot execute code.

    python -m rn50.checkpoint fingerprint CHECKPOINT   # SHA-256 of the model weights
    python -m rn50.checkpoint verify CHECKPOINT        # files match the manifest?
    python -m rn50.checkpoint ls RUN                   # a run's checkpoints, each verified
(local paths or s3:// URIs)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


# Ray names checkpoint folders checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff> (sorting is chronological);
# the same run folder also holds checkpoint_manager_snapshot.json, which is not one.
CHECKPOINT_DIR_NAME = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_[\d.-]+$")


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


def gather_rng_states() -> list[dict[str, Any]]:
    """Every worker's RNG states in rank order (a collective when torch.distributed is set up)."""
    state = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


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
                   config_dict: dict, extra: dict | None = None, scaler=None,
                   rng_per_rank: list[dict] | None = None) -> dict[str, Any]:
    """Everything a bit-exact resume needs, after `steps_done` optimizer steps of `epoch`.

    `rng_per_rank` holds every worker's RNG states (gathered by the caller, rank order); without
    it, this process's states stand for rank 0."""
    from rn50.core.model import unwrap
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch, "steps_done": steps_done, "config": config_dict,
            "rng": rng_per_rank or [capture_rng_state()], **(extra or {})}


def rank0_training_state(rank: int, model, optimizer, scheduler, ema, epoch: int,
                         steps_done: int, config_dict: dict, extra: dict | None = None,
                         scaler=None) -> dict[str, Any] | None:
    """`training_state` with every rank's RNG states, on rank 0 (None elsewhere). A collective:
    every rank must call it at the same step."""
    rng_per_rank = gather_rng_states()
    if rank != 0:
        return None
    return training_state(model, optimizer, scheduler, ema, epoch, steps_done, config_dict, extra,
                          scaler=scaler, rng_per_rank=rng_per_rank)


def apply_training_state(state: dict[str, Any], model, optimizer, scheduler, ema,
                         steps_per_epoch: int, scaler=None, rank: int = 0) -> tuple[int, int]:
    """Load `state` into the live objects (RNGs: this rank's); return (epoch, step) to continue from."""
    from rn50.core.model import unwrap
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    # Older checkpoints hold one dict; a resume on more workers than saved reuses states cyclically.
    rng_states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    restore_rng_state(rng_states[rank % len(rng_states)])
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


def verify_remote(uri: str) -> dict[str, Any]:
    """Like `verify_checkpoint` for a local path or s3:// checkpoint, streaming each file."""
    from rn50.io import storage
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} has no {MANIFEST_FILE}: it was not finished") from None
    except ValueError as err:
        raise CheckpointError(f"checkpoint {uri} has an unreadable manifest: {err}") from None
    for name, expected in manifest.get("files", {}).items():
        try:
            data = storage.read_bytes(storage.join(uri, name))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {uri} is missing {name}") from None
        if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"checkpoint {uri}: {name} does not match its manifest "
                                  f"({len(data)} bytes, manifest says {expected['size']})")
    return manifest


def check_uploaded(filesystem, path: str) -> None:
    """Cheap check of an uploaded copy: manifest readable, every file there at its manifest size.

    Run before Ray is told about a checkpoint, so older ones are pruned only once a newer copy is
    complete in storage (a full SHA-256 pass would mean downloading it again)."""
    import pyarrow.fs as pafs
    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST_FILE}") as stream:
            files = json.loads(stream.read())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"uploaded checkpoint {path} has no readable manifest: {err}") from None
    infos = filesystem.get_file_info([f"{path}/{name}" for name in files])
    for (name, expected), info in zip(files.items(), infos):
        if info.type != pafs.FileType.File or info.size != expected["size"]:
            raise CheckpointError(f"uploaded checkpoint {path}: {name} is {info.size} bytes in "
                                  f"storage, the manifest says {expected['size']}")


def list_checkpoints(run_uri: str) -> list[dict[str, Any]]:
    """One row per `checkpoint_*` of a run: name, epoch, steps, size, val_top1, verified."""
    from rn50.io import storage
    rows = []
    for name in sorted(n for n in storage.list_dir(run_uri) if CHECKPOINT_DIR_NAME.match(n)):
        uri = storage.join(run_uri, name)
        row = {"checkpoint": name, "epoch": None, "steps_done": None, "size_mb": None,
               "val_top1": None, "verified": "yes"}
        try:
            manifest = verify_remote(uri)
        except CheckpointError as err:
            row["verified"] = f"NO: {err}"
        else:
            summary = manifest.get("summary", {})
            row.update(epoch=summary.get("epoch"), steps_done=summary.get("steps_done", "end"),
                       val_top1=summary.get("val_top1"),
                       size_mb=round(sum(f["size"] for f in manifest["files"].values()) / 2**20, 1))
        rows.append(row)
    return rows


def _load_any(uri: str) -> dict[str, Any]:
    """Load a local or s3:// checkpoint (an S3 one is copied to a temporary folder first)."""
    if not uri.startswith("s3://"):
        return load_checkpoint(uri)
    import tempfile

    import pyarrow.fs as pafs

    from rn50.io import storage
    filesystem, path = storage.resolve_storage(uri)
    with tempfile.TemporaryDirectory(prefix="rn50-ckpt-") as local:
        pafs.copy_files(path, local, source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(local)


def main(argv: list[str] | None = None) -> int:
    """CLI: `fingerprint CKPT`, `verify CKPT`, `ls RUN` (local paths or s3:// URIs)."""
    parser = argparse.ArgumentParser(prog="python -m rn50.checkpoint")
    parser.add_argument("command", choices=["fingerprint", "verify", "ls"])
    parser.add_argument("uri", help="a checkpoint (fingerprint, verify) or a run directory (ls)")
    args = parser.parse_args(argv)
    try:
        if args.command == "ls":
            for row in list_checkpoints(args.uri):
                top1 = "-" if row["val_top1"] is None else f"{row['val_top1']:.2f}"
                print(f"{row['checkpoint']}  epoch={row['epoch']} steps={row['steps_done']} "
                      f"size_mb={row['size_mb']} val_top1={top1} verified={row['verified']}")
        elif args.command == "verify":
            print(f"OK {args.uri} {json.dumps(verify_remote(args.uri)['summary'])}")
        else:
            print(fingerprint_weights(_load_any(args.uri)["model"]))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
