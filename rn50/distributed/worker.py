"""The Ray Train V2 worker side of training: the loop every training worker runs.

Read top to bottom: `train_loop_per_worker` runs in every worker process (Ray sets up
torch.distributed), restores the newest checkpoint that verifies, and trains epoch by epoch,
checkpointing at epoch ends, every N steps / M minutes and on a preemption notice. Every rank
reports; rank 0 attaches the checkpoint. The driver that launches it is `rn50/driver.py`;
everything not Ray-specific lives in the plain-PyTorch modules.
"""
from __future__ import annotations

import logging
import os
import posixpath
import signal
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist

from rn50.core import checkpoint as ckpt
from rn50.io import tracking
from rn50.config import Config
from rn50.data.loaders import build_datasets, build_loader, dataset_classes, set_train_crop_px
from rn50.core.engine import (build_grad_scaler, build_optimizer, evaluate, maybe_compile,
                         train_one_epoch)
from rn50.core.model import EMA, build_model, place_model
from rn50.core.schedule import build_scheduler
from rn50.data.transforms import train_crop_px_at

logger = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised on purpose by `faults.raise_at_epoch` to test recovery."""


def _log(rank: int, message: str) -> None:
    # Through logging, not print: Ray Train routes worker loggers to the driver's console and to
    # its per-worker log files (a patched print would be echoed twice).
    if rank == 0:
        logger.info("[rn50 rank0] %s", message)


def _pick_device() -> torch.device:
    # A node may advertise a GPU to Ray without torch seeing one (fake clusters, broken drivers):
    # trust torch, not the resource label.
    if torch.cuda.is_available():
        return ray.train.torch.get_device()
    return torch.device("cpu")


def _wrap_ddp(model, device: torch.device):
    """DDP over NCCL when torch sees a GPU, else over the gloo group Ray set up."""
    if device.type != "cuda":
        return torch.nn.parallel.DistributedDataParallel(model)
    # Ray's default group is gloo (see build_trainer), so gradients get their own NCCL group.
    nccl = dist.new_group(backend="nccl")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index],
                                                     process_group=nccl)


def _load_data(config: Config):
    """Datasets for this worker; one process per node writes any cached files, the rest wait."""
    context = ray.train.get_context()
    if context.get_local_rank() == 0:
        build_datasets(config.data)
    if dist.is_initialized():
        dist.barrier()
    return build_datasets(config.data)


def _checkpoints_newest_first(latest: ray.train.Checkpoint | None) -> list[ray.train.Checkpoint]:
    """Every checkpoint folder of this run in storage, newest first (their names sort by time).

    Storage, not only Ray's record, is the source: a checkpoint uploaded moments before a crash may
    never have reached the controller's snapshot, and it is still the newest complete state."""
    storage = ray.train.get_context().get_storage()
    filesystem, run_dir = storage.storage_filesystem, storage.experiment_fs_path
    listing = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    paths = {info.path.rstrip("/") for info in listing if info.type == pafs.FileType.Directory
             and posixpath.basename(info.path.rstrip("/")).startswith("checkpoint_")}
    if latest is not None:
        paths.add(latest.path.rstrip("/"))
    ordered = sorted(paths, key=posixpath.basename, reverse=True)
    return [ray.train.Checkpoint(path, filesystem=filesystem) for path in ordered]


def _newest_good_checkpoint(latest: ray.train.Checkpoint | None) -> tuple[str | None, dict | None]:
    """The newest checkpoint whose files match its manifest; broken ones are named and skipped."""
    candidates = _checkpoints_newest_first(latest)
    for candidate in candidates:
        try:
            with candidate.as_directory() as directory:
                return candidate.path, ckpt.load_checkpoint(directory)
        except (ckpt.CheckpointError, OSError) as err:
            logger.warning("skipping checkpoint %s: %s", candidate.path, err)
    if candidates:
        raise ckpt.CheckpointError(f"no checkpoint of this run verifies (newest: {candidates[0].path});"
                                   " start a fresh run with a new --name, or fix the storage")
    return None, None


def _load_resume_state(rank: int) -> dict | None:
    """Rank 0 picks the checkpoint to resume from; every rank loads that same one."""
    latest = ray.train.get_checkpoint()
    chosen, state = _newest_good_checkpoint(latest) if rank == 0 else (None, None)
    if dist.is_initialized():
        shared = [chosen]
        dist.broadcast_object_list(shared, src=0)  # all ranks must agree, whatever storage shows
        chosen = shared[0]
    if chosen is None:
        return None
    if state is None:
        checkpoint = ray.train.Checkpoint(chosen, filesystem=ray.train.get_context().get_storage()
                                          .storage_filesystem)
        with checkpoint.as_directory() as directory:
            state = ckpt.load_checkpoint(directory)
    unregistered = latest is None or posixpath.basename(chosen) > posixpath.basename(latest.path)
    _log(rank, f"resumed from {chosen} (epoch {state['epoch']}, {state.get('steps_done', '?')} "
               "steps done)" + (", newer than Ray's record of the run" if unregistered else ""))
    return state


def _maybe_inject_fault(config: Config, epoch: int, rank: int) -> None:
    marker = Path(config.faults.marker_path) if config.faults.marker_path else None
    if rank != 0 or epoch != config.faults.raise_at_epoch or (marker and marker.exists()):
        return
    if marker:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fault injected at epoch {epoch}\n")
    raise InjectedFault(f"injected fault at the start of epoch {epoch} (faults.raise_at_epoch)")


def _maybe_kill_self(config: Config, global_step: int, rank: int, world_size: int) -> None:
    """Testing aid: a real SIGKILL of this worker process, once (the marker file remembers)."""
    marker = Path(config.faults.marker_path) if config.faults.marker_path else None
    if global_step != config.faults.kill_at_step or rank != world_size - 1 \
            or (marker and marker.exists()):
        return
    if marker:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"SIGKILL at global step {global_step}\n")
    logger.warning("faults.kill_at_step: SIGKILL to worker rank %d at step %d", rank, global_step)
    os.kill(os.getpid(), signal.SIGKILL)


def _report(metrics: dict, state: dict | None, rank: int) -> None:
    """Every rank reports; rank 0 attaches its checkpoint, uploaded while training goes on."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    # Serialising the state is the only pause; Ray uploads the folder in the background and
    # deletes it afterwards. The manifest inside is what makes a half-uploaded copy unloadable.
    directory = tempfile.mkdtemp(prefix="rn50-ckpt-")
    ckpt.save_checkpoint(directory, state, summary=metrics)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=_upload_with_retries(ray.train.get_context().get_storage()))


UPLOAD_ATTEMPTS = 6  # 2+4+8+16+30 s of back-off: rides out a storage restart of ~1 minute


def _upload_with_retries(storage_context):
    """Ray's own upload, retried with back-off (a storage blip must not cost a restart).

    A retry rewrites the same folder; a copy torn by the outage is never loaded because its
    files do not match the manifest. Ray records the checkpoint (and prunes older ones beyond
    `keep_last`) only after this returns, so the last good checkpoint outlives a failed upload."""
    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                persisted = storage_context.persist_current_checkpoint(checkpoint, dir_name)
                ckpt.check_uploaded(persisted.filesystem, persisted.path)
                return persisted
            except Exception as err:  # noqa: BLE001 - pyarrow raises OSError and friends
                if attempt == UPLOAD_ATTEMPTS:
                    raise
                delay_s = min(2 ** attempt, 30)
                logger.warning("checkpoint upload %s failed (attempt %d/%d): %s; retrying in %d s",
                               dir_name, attempt, UPLOAD_ATTEMPTS, err, delay_s)
                time.sleep(delay_s)
        raise AssertionError("unreachable")
    return upload


class _MidEpochSaves:
    """Decides when to checkpoint inside an epoch: every N steps and/or every M minutes.

    Every rank must call `ray.train.report` the same number of times, so a time-based decision
    is taken on rank 0 and broadcast."""

    def __init__(self, config: Config, device: torch.device):
        self.every_steps = config.checkpoint.every_steps
        self.every_s = config.checkpoint.every_minutes * 60
        self.device, self.last_save = device, time.monotonic()
        self.preemption_every = config.checkpoint.preemption_check_every_steps
        self.preemption_seen = False

    def due(self, steps_done: int) -> bool:
        """Whether to checkpoint after `steps_done` steps of the current epoch."""
        due = bool(self.every_steps) and steps_done % self.every_steps == 0
        if self.every_s:
            flag = torch.tensor([time.monotonic() - self.last_save >= self.every_s],
                                dtype=torch.int32, device=self.device)
            if dist.is_initialized():
                dist.broadcast(flag, src=0)
            due = due or bool(flag.item())
        return due

    def preempted(self, steps_done: int) -> bool:
        """True once, when Ray first reports that a node of this run is being preempted."""
        if not self.preemption_every or steps_done % self.preemption_every or self.preemption_seen:
            return False
        info = ray.train.get_preemption_info()  # a barrier: every rank asks at the same steps
        if info is not None:
            logger.warning("preemption notice: %s; checkpointing now", info)
            self.preemption_seen = True
        return self.preemption_seen

    def saved(self) -> None:
        """Restart the clock after any checkpoint."""
        self.last_save = time.monotonic()


def train_loop_per_worker(loop_config: dict) -> None:
    """The training loop every Ray Train worker runs."""
    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.train.torch_threads)
    device = _pick_device()
    train_set, val_set, class_names = _load_data(config)
    batch_per_worker = config.train.global_batch_size // world_size

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = place_model(build_model(config.model, config.data.num_classes), device,
                        config.model.channels_last)
    if world_size > 1:
        model = _wrap_ddp(model, device)
    model = maybe_compile(model, config.train.compile)
    # Full batches per rank, as the samplers deal them (equal on every rank).
    steps_per_epoch = len(build_loader(train_set, batch_per_worker, rank, world_size,
                                       config.train.seed, 0, True))
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global "
                         f"batch ({config.train.global_batch_size}); lower train.global_batch_size")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, steps_per_epoch, config.train.epochs, config.schedule)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    scaler = build_grad_scaler(device, config)
    start_epoch, start_step = 0, 0
    state = _load_resume_state(rank)
    if state is not None:
        start_epoch, start_step = ckpt.apply_training_state(
            state, model, optimizer, scheduler, ema, steps_per_epoch, scaler=scaler, rank=rank)
    tracking_uri, run_id = loop_config["tracking_uri"], loop_config["mlflow_run_id"]
    if rank == 0:
        tracking.set_tags(tracking_uri, run_id, {"device": device.type, "world_size": world_size})

    classes = {"class_names": class_names, "class_wnids": dataset_classes(train_set)[1]}

    def snapshot(epoch: int, steps_done: int) -> dict | None:
        return ckpt.rank0_training_state(rank, model, optimizer, scheduler, ema, epoch, steps_done,
                                         config.to_dict(), classes, scaler)

    saves = _MidEpochSaves(config, device)
    for epoch in range(start_epoch, config.train.epochs):
        _maybe_inject_fault(config, epoch, rank)
        skip = start_step if epoch == start_epoch else 0

        def after_step(steps_done: int, epoch: int = epoch) -> None:
            _maybe_kill_self(config, epoch * steps_per_epoch + steps_done, rank, world_size)
            if steps_done >= steps_per_epoch:
                return  # the end-of-epoch checkpoint follows
            reason = "preemption" if saves.preempted(steps_done) else \
                "schedule" if saves.due(steps_done) else None
            if reason:
                _log(rank, f"checkpoint at epoch {epoch} step {steps_done} ({reason})")
                _report({"epoch": epoch, "steps_done": steps_done, "reason": reason},
                        snapshot(epoch, steps_done), rank)
                saves.saved()

        # Data order and each image's augmentation depend only on (seed, epoch, index): a resumed
        # run sees the same images, cropped the same way, as one that never stopped.
        crop_px = train_crop_px_at(config.data, epoch)  # a function of the epoch: resumes exactly
        set_train_crop_px(train_set, crop_px)
        train_loader = build_loader(train_set, batch_per_worker, rank, world_size, config.train.seed,
                                    epoch, True, config.data.loader_workers, skip_batches=skip)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, ema, device, config,
                                log=lambda message: _log(rank, f"epoch {epoch} {message}"),
                                start_step=skip, after_step=after_step, scaler=scaler)
        val_loader = build_loader(val_set, batch_per_worker, rank, world_size,
                                  config.train.seed, epoch, False, config.data.loader_workers)
        val = evaluate(model, val_loader, device, config.model.channels_last, config.train.amp,
                       config.train.amp_dtype)
        metrics = {"epoch": epoch, "train_loss": stats.loss, "val_top1": val["top1"],
                   "val_top5": val["top5"], "val_loss": val["loss"], "lr": lr,
                   "images_per_s": stats.images_per_s, "skipped_images": stats.skipped_images,
                   "train_crop_px": crop_px}
        _log(rank, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if rank == 0:
            tracking.log_metrics(tracking_uri, run_id, _mlflow_names(metrics), step=epoch)
        last = epoch == config.train.epochs - 1
        wants_checkpoint = last or (epoch + 1) % config.checkpoint.every_epochs == 0
        _report(metrics, snapshot(epoch, steps_per_epoch) if wants_checkpoint else None, rank)
        saves.saved()


def _mlflow_names(metrics: dict) -> dict:
    names = {"train_loss": "train/loss", "val_top1": "val/top1", "val_top5": "val/top5",
             "val_loss": "val/loss"}
    return {names.get(k, k): v for k, v in metrics.items() if k != "epoch"}
