"""The Ray Train V2 worker side of training: the loop every training worker runs.

Read top to bottom: `train_loop_per_worker` runs in every worker process (Ray sets up
torch.distributed). `_set_up` builds data, model and optimizer and restores the newest checkpoint
that verifies; `_train` then goes epoch by epoch, checkpointing at epoch ends, every N steps / M
minutes and on a preemption notice. Every rank reports; rank 0 attaches the checkpoint. The driver
that launches it is `rn50/distributed/driver.py`; everything not Ray-specific lives below, in
`rn50.core` and `rn50.data`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import posixpath
from dataclasses import dataclass, field

import ray
import ray.train
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from rn50.config import Config
from rn50.io import checkpoints as ckpt
from rn50.core.device import maybe_compile
from rn50.core.engine import build_grad_scaler, build_optimizer, evaluate, train_one_epoch
from rn50.core.model import EMA, build_model, place_model, unwrap
from rn50.core.resume_order import check_same_steps, resumed_order
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.epoch_loader import EpochLoader
from rn50.data.loaders import (build_datasets, dataset_classes,
                               set_train_crop_px)
from rn50.data.samplers import micro_batch_slots
from rn50.data.transforms import train_crop_px_at
from rn50.distributed.contexts import RunContext
from rn50.distributed.reporting import report
from rn50.distributed.cost import BudgetGuard, spent_now
from rn50.distributed.run_metrics import (EpochClock, quiet_ray_console, step_metrics_logger,
                                          system_metrics)
from rn50.distributed.save_schedule import MidEpochSaves
from rn50.distributed.worker_cpus import resolve_cpu_plan
from rn50.distributed.worker_device import pick_device, report_device, wrap_ddp
from rn50.io import staging
from rn50.io.pricing import CostBasis
from rn50.records import CheckpointExtras, EpochReport, StopReason

logger = logging.getLogger(__name__)


def _log(rank: int, message: str) -> None:
    # Through logging, not print: Ray Train routes worker loggers to the driver's console and to
    # its per-worker log files (a patched print would be echoed twice).
    if rank == 0:
        logger.info("[rn50 rank0] %s", message)


@dataclass
class _Worker:
    """What one worker builds before its first epoch."""
    config: Config
    rank: int
    world_size: int
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    class_names: list[str]
    slots: list[int]
    """The micro-batches of every step this rank trains (`micro_batch_slots`)."""
    steps_per_epoch: int
    state: TrainingState
    start_epoch: int = 0
    start_step: int = 0
    best_value: float | None = None
    """The best `checkpoint.keep_best_by` value so far (saved in checkpoints, so it resumes)."""
    resumed_order: int = 0
    """The micro-batches per step the resumed epoch was dealt for, where the checkpoint's differ
    from this run's (0: the same): that epoch finishes in its order (rn50.core.resume_order)."""
    cost: CostBasis | None = None
    """The run's cost basis (`RunContext.cost`): rank 0's checkpoints record the cost so far."""
    loader_workers: int = 0
    """`data.loader_workers` resolved for this worker (rn50.distributed.worker_cpus)."""

    loaders: dict = field(default_factory=dict)
    """The train and val `EpochLoader`s, built at first use; their workers live for the run."""

    def loader(self, dataset: Dataset, epoch: int, train: bool, skip_steps: int = 0):
        """This rank's loader of `dataset` set up for `epoch` (rn50.data.epoch_loader)."""
        if train not in self.loaders:
            self.loaders[train] = _epoch_loader(self.config, dataset, self.rank, self.world_size,
                                                self.device, self.loader_workers, train)
        crop_px = train_crop_px_at(self.config.data, epoch) if train else 0
        order = self.resumed_order if train and skip_steps else 0  # only the resumed epoch
        return self.loaders[train].epoch(epoch, skip_steps, crop_px, order)

    def snapshot(self, epoch: int, steps_done: int) -> dict | None:
        """The checkpoint state on rank 0 (None elsewhere); a collective."""
        samples_done = steps_done * self.config.train.global_batch_size  # at any world size
        extras = CheckpointExtras(samples_done=samples_done, world_size=self.world_size,
                                  class_names=self.class_names,
                                  class_wnids=dataset_classes(self.train_set)[1],
                                  best_value=self.best_value,
                                  **(spent_now(self.cost) if self.rank == 0 else {}))
        return self.state.snapshot(self.rank, epoch, steps_done, self.config.to_dict(), extras)

    def improves_best(self, report: EpochReport) -> bool:
        """Whether this epoch's `checkpoint.keep_best_by` metric beats the best so far (and if
        so, remember it)."""
        metric = self.config.checkpoint.keep_best_by
        value = None if metric == "none" else getattr(report, metric)
        if value is None or (self.best_value is not None and value <= self.best_value):
            return False
        self.best_value = value
        return True


def train_loop_per_worker(run: RunContext) -> None:
    """The training loop every Ray Train worker runs."""
    quiet_ray_console(run.config.train.ray_log_level)
    device = pick_device(run.config)  # before anything else: a node without its GPU stops here
    staging.remove_orphaned()  # a killed worker's unsent checkpoints would fill the node's disk
    with system_metrics(run):
        worker = _set_up(run.config, device)
        worker.cost = run.cost
        report_device(run, device, worker.rank)
        if worker.rank == 0:
            run.tracker.set_tags({"device": worker.device.type, "world_size": worker.world_size})
            # Over time too: an elastic run shrinks and grows, each time from a checkpoint.
            run.tracker.log_metrics({"world_size": worker.world_size},
                                    step=worker.state.scheduler.last_epoch)
        _train(worker, run)


def _set_up(config: Config, device: torch.device) -> _Worker:
    """Data, model, optimizer, schedule; then the newest good checkpoint, if the run has one."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cpus = resolve_cpu_plan(config, device)  # `auto` threads and loaders from the node's CPUs
    torch.set_num_threads(cpus.torch_threads)
    train_set, val_set, class_names = _load_data(config)

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = place_model(build_model(config.model, config.data.num_classes), device,
                        config.model.channels_last)
    if world_size > 1:
        model = wrap_ddp(model, device)
    model = maybe_compile(model, config.train.compile, config.micro_batch_size)
    # The run's train loader, built once: its global steps, as the samplers deal them, are the
    # same at every world size.
    train_loader = _epoch_loader(config, train_set, rank, world_size, device, cpus.loader_workers,
                                 train=True)
    steps_per_epoch = train_loader.steps
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global "
                         f"batch ({config.train.global_batch_size}); lower train.global_batch_size")
    optimizer = build_optimizer(model, config)
    state = TrainingState(
        model, optimizer,
        build_scheduler(optimizer, steps_per_epoch, config.train.epochs, config.schedule),
        ema=EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None,
        scaler=build_grad_scaler(device, config))
    worker = _Worker(config, rank, world_size, device, train_set, val_set, class_names,
                     micro_batch_slots(rank, world_size, config.micro_batches_per_step),
                     steps_per_epoch, state, loader_workers=cpus.loader_workers,
                     loaders={True: train_loader})
    resumed = _load_resume_state(rank)
    if resumed is not None:
        check_same_steps(resumed, config)
        worker.resumed_order = resumed_order(resumed, config, train_set, steps_per_epoch)
        worker.start_epoch, worker.start_step = worker.state.restore(
            resumed, worker.steps_per_epoch, rank=rank)
        if worker.resumed_order and worker.start_step:
            _log(rank, f"epoch {worker.start_epoch} finishes in the order of the checkpoint's "
                       f"{worker.resumed_order} micro-batches per step, split in "
                       f"{config.micro_batches_per_step}: each of its samples once")
        worker.best_value = CheckpointExtras.from_state(resumed).best_value
    return worker


def _epoch_loader(config: Config, dataset: Dataset, rank: int, world_size: int,
                  device: torch.device, loader_workers: int, train: bool) -> EpochLoader:
    """This rank's train or val loader for the whole run; its worker processes live as long."""
    return EpochLoader(dataset, config.micro_batch_size, rank=rank, world_size=world_size,
                       seed=config.train.seed, train=train, loader_workers=loader_workers,
                       repeated_augmentations=config.data.repeated_augmentations,
                       micro_batches_per_step=config.micro_batches_per_step,
                       channels_last=config.model.channels_last and device.type == "cuda")


def _train(worker: _Worker, run: RunContext) -> None:
    """Epoch by epoch from where the run left off; a checkpoint whenever one is due."""
    config, rank, state = worker.config, worker.rank, worker.state
    saves = MidEpochSaves(config, worker.device)
    eta = EpochClock(config.train.epochs - worker.start_epoch)
    log_step_metrics = step_metrics_logger(run) if rank == 0 else None  # one per run: warns once
    budget = BudgetGuard(run.cost, run.tracker, rank)
    logged = _epochs_in_mlflow(run) if rank == 0 else set()
    for epoch in range(worker.start_epoch, config.train.epochs):
        skip = worker.start_step if epoch == worker.start_epoch else 0

        def after_step(steps_done: int, epoch: int = epoch) -> None:
            if steps_done >= worker.steps_per_epoch:
                return  # the end-of-epoch checkpoint follows
            reason = "preemption" if saves.preempted(steps_done) else \
                "schedule" if saves.due(steps_done) else None
            if reason:
                _log(rank, f"checkpoint at epoch {epoch} step {steps_done} ({reason})")
                report({"epoch": epoch, "steps_done": steps_done, "reason": reason},
                       worker.snapshot(epoch, steps_done), rank)
                saves.saved()

        # Data order and each image's augmentation depend only on (seed, epoch, index): a resumed
        # run sees the same images, cropped the same way, as one that never stopped.
        crop_px = train_crop_px_at(config.data, epoch)  # a function of the epoch: resumes exactly
        set_train_crop_px(worker.train_set, crop_px)
        lr = state.optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(
            state, worker.loader(worker.train_set, epoch, train=True, skip_steps=skip),
            worker.device, config, log=lambda message: _log(rank, f"epoch {epoch} {message}"),
            start_step=skip, after_step=after_step, on_step_metrics=log_step_metrics,
            micro_slots=worker.slots)
        epoch_report = EpochReport(epoch=epoch, train_loss=stats.loss, **_validate(worker, epoch),
                                   lr=lr, images_per_s=stats.images_per_s,
                                   skipped_images=stats.skipped_images, train_crop_px=crop_px)
        _log(rank, " ".join(f"{k}={v:.4g}" for k, v in epoch_report.metrics().items())
             + eta.epoch_done())
        if rank == 0 and epoch in logged:
            _log(rank, f"epoch {epoch} is in MLflow already, from a start whose checkpoint of it "
                       "was lost: not logged twice")
        elif rank == 0:
            run.tracker.log_metrics(epoch_report.mlflow_metrics(), step=epoch)
        last = epoch == config.train.epochs - 1
        best = worker.improves_best(epoch_report)  # the best is always checkpointed, to be kept
        stop = budget.stop_after(epoch, last)  # the next epoch would pass train.budget_usd
        # The run's last report says why it ends: Ray's final result carries it to the driver.
        reason = StopReason.BUDGET if stop else StopReason.FINISHED if last else None
        epoch_report = dataclasses.replace(epoch_report, stop_reason=reason.value if reason else "")
        wants_checkpoint = best or last or stop or (epoch + 1) % config.checkpoint.every_epochs == 0
        report(epoch_report.metrics(), worker.snapshot(epoch, worker.steps_per_epoch)
               if wants_checkpoint else None, rank, keep_as_best=best)
        saves.saved()
        if stop:  # checkpointed above; the driver reports the stop and a rerun continues
            break


def _validate(worker: _Worker, epoch: int) -> dict[str, float]:
    """Validation metrics of the model (and of its EMA weights when the best is chosen by them)."""
    config = worker.config
    val = evaluate(worker.state.model, worker.loader(worker.val_set, epoch, train=False),
                   worker.device, channels_last=config.model.channels_last,
                   amp=config.train.amp, amp_dtype=config.train.amp_dtype)
    metrics = {"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
    if config.checkpoint.keep_best_by == "val_top1_ema":
        metrics["val_top1_ema"] = _evaluate_ema(worker, epoch)["top1"]
    return metrics


def _evaluate_ema(worker: _Worker, epoch: int) -> dict[str, float]:
    """Validation metrics of the EMA weights (a copy of the model holding them)."""
    averaged = copy.deepcopy(unwrap(worker.state.model))
    averaged.load_state_dict(worker.state.ema.state_dict())
    config = worker.config
    return evaluate(averaged, worker.loader(worker.val_set, epoch, train=False), worker.device,
                    channels_last=config.model.channels_last, amp=config.train.amp,
                    amp_dtype=config.train.amp_dtype)


def _load_data(config: Config):
    """Datasets for this worker; one process per node writes any cached files, the rest wait."""
    if ray.train.get_context().get_local_rank() == 0:
        build_datasets(config.data)
    if dist.is_initialized():
        dist.barrier()
    return build_datasets(config.data)


def _load_resume_state(rank: int) -> dict | None:
    """Rank 0 picks the checkpoint to resume from; every rank loads that same one."""
    latest = ray.train.get_checkpoint()
    storage_context = ray.train.get_context().get_storage()
    run = (storage_context.storage_filesystem, storage_context.experiment_fs_path)
    registered = latest.path if latest is not None else None
    chosen, state = ckpt.load_newest_good(run, registered) if rank == 0 else (None, None)
    if dist.is_initialized():
        shared = [chosen]
        dist.broadcast_object_list(shared, src=0)  # all ranks must agree, whatever storage shows
        chosen = shared[0]
    if chosen is None:
        return None
    if state is None:
        state = ckpt.load_state((run[0], chosen))
    unregistered = latest is None or posixpath.basename(chosen) > posixpath.basename(latest.path)
    world_size = ray.train.get_context().get_world_size()
    saved = CheckpointExtras.from_state(state).describe(state.get("steps_done"))
    _log(rank, f"resumed from {chosen} (epoch {state['epoch']}, {saved}, now {world_size})"
               + (", newer than Ray's record of the run" if unregistered else ""))
    return state


def _epochs_in_mlflow(run: RunContext) -> set[int]:
    """The epochs the run's MLflow run has already (an earlier start may have logged an epoch
    and lost it before its checkpoint landed: the redone epoch is not logged twice; at the same
    world size its figures are the same to the bit)."""
    try:
        return run.tracker.logged_steps(EpochReport.mlflow_name("val_top1"))
    except Exception as err:  # noqa: BLE001 - MLflow down must never stop training
        logger.warning("could not read the run's MLflow history (%s): epochs are logged as "
                       "they end", err)
        return set()

