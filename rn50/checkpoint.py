"""`python -m rn50.checkpoint`: look at checkpoints from the command line (local or s3://).

    python -m rn50.checkpoint fingerprint CHECKPOINT   # SHA-256 of the model weights
    python -m rn50.checkpoint verify CHECKPOINT        # files match the manifest?
    python -m rn50.checkpoint ls RUN                   # a run's checkpoints, each verified,
                                                       # the best (checkpoint.keep_best_by) marked

The API underneath is `rn50.io.checkpoints`.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import sys
from typing import Any

from rn50.io.checkpoints import (CheckpointError, best_checkpoint, checkpoint_names, files_bytes,
                                 load_state, verify)
from rn50.core.training_state import fingerprint_weights
from rn50.io import storage


def list_checkpoints(run_uri: str) -> list[dict[str, Any]]:
    """One row per checkpoint of a run (its `checkpoint_*` folders, then its best copy): name,
    epoch, steps, size, val_top1, verified, best."""
    best = best_checkpoint(run_uri)
    rows = []
    for name in checkpoint_names(run_uri):
        row = {"checkpoint": name, "epoch": None, "steps_done": None, "size_mb": None,
               "val_top1": None, "verified": "yes",
               "best": bool(best) and posixpath.basename(name) == posixpath.basename(best)}
        try:
            manifest = verify(storage.join(run_uri, name))
        except CheckpointError as err:
            row["verified"] = f"NO: {err}"
        else:
            summary = manifest.get("summary", {})
            row.update(epoch=summary.get("epoch"), steps_done=summary.get("steps_done", "end"),
                       val_top1=summary.get("val_top1"),
                       size_mb=round(files_bytes(manifest) / 2**20, 1))
        rows.append(row)
    return rows


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
                      f"size_mb={row['size_mb']} val_top1={top1} verified={row['verified']}"
                      + ("  <- best" if row["best"] else ""))
        elif args.command == "verify":
            print(f"OK {args.uri} {json.dumps(verify(args.uri)['summary'])}")
        else:
            print(fingerprint_weights(load_state(args.uri)["model"]))
    except (CheckpointError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
