"""What a bit-exact resume needs: the live training objects, their RNGs, and the state dict of both.

`TrainingState` bundles the objects one training process updates (model, optimizer, per-step LR
schedule, EMA, loss scaler). `snapshot()` turns them into the plain state dict a checkpoint holds;
`restore()` loads one back and says where in the run to continue. The files themselves (manifest,
upload, verification) are `rn50.io.checkpoints`'s concern.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rn50.core.model import EMA, unwrap
from rn50.records import (STATE_FORMAT_VERSION, STATE_VERSION_KEY, CheckpointExtras,
                          check_state_version)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain tensors/lists (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss,
                      np_gauss],
            "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss,
                         np_gauss))
    torch.set_rng_state(state["torch"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every worker's RNG states in rank order (a collective when torch.distributed is set up)."""
    state = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


@dataclass
class TrainingState:
    """The objects one training process updates, handed as one to the checkpoint code."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: EMA | None = None
    scaler: torch.amp.GradScaler | None = None

    def state_dict(self, epoch: int, steps_done: int, config_dict: dict,
                   extra: CheckpointExtras | None = None,
                   rng_per_rank: list[dict] | None = None) -> dict[str, Any]:
        """Everything a bit-exact resume needs, after `steps_done` optimizer steps of `epoch`.

        `rng_per_rank` holds every worker's RNG states in rank order; without it, this process's
        states stand for rank 0."""
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "epoch": epoch, "steps_done": steps_done, "config": config_dict,
                "rng": rng_per_rank or [capture_rng_state()],
                **(extra.to_state() if extra else {}),
                STATE_VERSION_KEY: STATE_FORMAT_VERSION}

    def snapshot(self, rank: int, epoch: int, steps_done: int, config_dict: dict,
                 extra: CheckpointExtras | None = None) -> dict[str, Any] | None:
        """`state_dict` with every rank's RNG states, on rank 0 (None elsewhere). A collective:
        every rank must call it at the same step."""
        rng_per_rank = gather_rng_states()
        if rank != 0:
            return None
        return self.state_dict(epoch, steps_done, config_dict, extra, rng_per_rank)

    def restore(self, state: dict[str, Any], steps_per_epoch: int,
                rank: int = 0) -> tuple[int, int]:
        """Load `state` into the live objects (RNGs: this rank's); return (epoch, step) to go on
        from."""
        check_state_version(state)  # before any object is changed
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # Older checkpoints hold one dict; a resume on more workers than saved reuses states
        # cyclically.
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
