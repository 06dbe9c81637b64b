"""Every rank's report to Ray Train, with rank 0's checkpoint: serialised, then uploaded by Ray
in the background through our retrying, verifying upload function."""
from __future__ import annotations

import tempfile
import time
from typing import Callable

import ray
import ray.train

from rn50.core import checkpoint as ckpt

UploadObserver = Callable[[float, float], None]


def report(metrics: dict, state: dict | None, rank: int,
           on_upload: UploadObserver | None = None, keep_as_best: bool = False) -> None:
    """Every rank reports; rank 0 attaches its checkpoint, uploaded while training goes on.

    `on_upload(start_s, end_s)` (perf_counter seconds) is told when each upload finished;
    `keep_as_best` also copies the uploaded checkpoint into the run's `best/` folder."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    # Serialising the state is the only pause; Ray uploads the folder in the background and
    # deletes it afterwards. The manifest inside is what makes a half-uploaded copy unloadable.
    directory = tempfile.mkdtemp(prefix="rn50-ckpt-")
    ckpt.save_checkpoint(directory, state, summary=metrics)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=_verified_upload(ray.train.get_context().get_storage(),
                                                           on_upload, keep_as_best))


def _verified_upload(storage_context, on_upload: UploadObserver | None, keep_as_best: bool):
    """Ray's own upload, retried and checked by `rn50.core.checkpoint.upload_with_retries`."""
    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        start_s = time.perf_counter()
        persisted: list[ray.train.Checkpoint] = []

        def persist() -> ckpt.Location:
            persisted[:] = [storage_context.persist_current_checkpoint(checkpoint, dir_name)]
            return persisted[0].filesystem, persisted[0].path
        ckpt.upload_with_retries(persist, dir_name)
        if keep_as_best:  # before Ray hears of it: Ray may prune the original later
            ckpt.keep_as_best((storage_context.storage_filesystem,
                               storage_context.experiment_fs_path), persisted[0].path)
        if on_upload is not None:
            on_upload(start_s, time.perf_counter())
        return persisted[0]
    return upload
