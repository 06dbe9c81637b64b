"""Every rank's report to Ray Train, with rank 0's checkpoint: copied to host memory, then written
and uploaded in the background through our retrying, verifying upload function."""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable

import ray
import ray.train

from rn50.io import checkpoints as ckpt
from rn50.io import staging
from rn50.core.background_save import save_in_background

UploadObserver = Callable[[float, float], None]


def report(metrics: dict, state: dict | None, rank: int,
           on_upload: UploadObserver | None = None, keep_as_best: bool = False) -> None:
    """Every rank reports; rank 0 attaches its checkpoint, uploaded while training goes on.

    `on_upload(start_s, end_s)` (perf_counter seconds) is told when each upload finished;
    `keep_as_best` also copies the uploaded checkpoint into the run's `best/` folder."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    # Copying the state to host memory is the only pause: the write and SHA-256 run on a writer
    # thread (rn50.core.background_save), Ray's upload thread waits for them, uploads the folder
    # and deletes it afterwards. The manifest inside is what makes a half-written or
    # half-uploaded copy unloadable.
    directory = staging.staging_folder()
    written = save_in_background(directory, state, summary=metrics)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=_verified_upload(ray.train.get_context().get_storage(),
                                                           on_upload, keep_as_best, written))


def _verified_upload(storage_context, on_upload: UploadObserver | None, keep_as_best: bool,
                     written: Future | None = None):
    """Ray's own upload, retried and checked by `rn50.io.checkpoints.upload_with_retries`, of
    the folder `written` completes (its error, if the write failed, fails the upload)."""
    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        start_s = time.perf_counter()  # the write's remainder counts: it is off the loop too
        if written is not None:
            written.result()
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
