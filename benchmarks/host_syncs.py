"""Host syncs per training step: the operations that make the host wait for the device.

    python -m benchmarks.host_syncs        # -> results/host_syncs.json (CPU: ~1 min)

The project's `train_one_epoch` runs a ResNet-50 under `torch.profiler` with the checkpoint
schedule's hook (`MidEpochSaves`, `checkpoint.every_minutes` on) after every step, EMA on, two
accumulated micro-batches per step and NHWC batches as the GPU path's loader stacks them; each
step is a `ProfilerStep` range (from one step's end to the next), and in each the calls of:

- `aten::_local_scalar_dense` / `aten::is_nonzero`: a tensor read as a Python number (`.item()`,
  `float()`, `bool()`): on a GPU the host waits for every kernel queued before it;
- `aten::lift_fresh`: a tensor built from host data (`torch.tensor`, `as_tensor`): on a GPU a
  copy from pageable memory, which blocks the host likewise;
- `aten::nonzero` / `aten::masked_select`: outputs whose size the host must read back.

On a GPU the same run also records CUDA's own sync reports (`torch.cuda.set_sync_debug_mode
("warn")`) and device-to-host copies per step. On CPU a copy to the host cannot be told from any
other copy; the ops above are what a CPU run can see. Steps that write a progress line
(`train.log_every_steps`) read the loss on purpose and are reported apart. MixUp/CutMix draw their
mixing weight on the CPU (torchvision's `.item()` of a host tensor: no device sync), so the
`mixing` variant's count on CPU is an upper bound, reported, not a defect.
"""
from __future__ import annotations

import argparse
import collections
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from rn50.config import Config, load_config
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.model import EMA, build_model, place_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.loaders import collate_skip_corrupt

REPO = Path(__file__).resolve().parents[1]

SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::lift_fresh",
            "aten::nonzero", "aten::masked_select")
VARIANTS = {"default": [], "mixing": ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0"],
            "stochastic_depth": ["model.stochastic_depth_prob=0.1"]}


def sync_config(px: int, micro_batch: int, log_every: int, *overrides: str) -> Config:
    """imagenet_90ep with EMA, a minutes-based save schedule and 2 micro-batches per step."""
    return load_config("imagenet_90ep", [
        f"data.train_crop_px={px}", "data.num_classes=10", f"train.micro_batch_size={micro_batch}",
        f"train.global_batch_size={2 * micro_batch}", "scaling.num_workers=2",
        "train.ema_decay=0.999", f"train.log_every_steps={log_every}",
        "checkpoint.every_minutes=60", "checkpoint.preemption_check_every_steps=0", *overrides])


def nhwc_batches(config: Config, count: int) -> list:
    """`count` micro-batches of random uint8 images collated as the GPU path's loader does."""
    generator = torch.Generator().manual_seed(0)
    px, size = config.data.train_crop_px, config.micro_batch_size
    return [collate_skip_corrupt([(torch.randint(0, 256, (3, px, px), dtype=torch.uint8,
                                                 generator=generator), i % 10)
                                  for i in range(size)], channels_last=True)
            for _ in range(count)]


def _step_of(event, starts: list[float]) -> int | None:
    """Index of the ProfilerStep range an event starts in (ranges are back to back)."""
    index = None
    for i, start in enumerate(starts):
        if event.time_range.start >= start:
            index = i
    return index


def _save_schedule_check(config: Config, device: torch.device):
    """The checkpoint schedule's per-step decision, or None where Ray is not installed (a lent
    GPU running gpu_throughput.py from a bare checkout): the step alone is counted then."""
    try:
        from rn50.distributed.save_schedule import MidEpochSaves
    except ImportError:
        return None
    return MidEpochSaves(config, device).due


def count_host_syncs(config: Config, steps: int, device: torch.device) -> dict:
    """Per-step counts of the sync ops (and, on CUDA, sync warnings) over `steps` steps."""
    torch.manual_seed(0)
    model = place_model(build_model(config.model, config.data.num_classes), device,
                        config.model.channels_last)
    optimizer = build_optimizer(model, config)
    state = TrainingState(model, optimizer, build_scheduler(optimizer, steps, 1, config.schedule),
                          ema=EMA(model, config.train.ema_decay))
    batches = nhwc_batches(config, 2 * (steps + 1))
    if device.type == "cuda":  # as the loader hands them over there: pinned, copied async
        batches = [(images.pin_memory(), labels.pin_memory(), skipped)
                   for images, labels, skipped in batches]
    train_one_epoch(state, batches[:2], device, config, micro_slots=[0, 1])  # warm-up step
    saves_due, cuda_warnings = _save_schedule_check(config, device), [0] * (steps + 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings(record=True) as caught, profile(
            activities=activities, schedule=schedule(wait=0, warmup=0, active=steps + 2)) as prof:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")

        def after_step(steps_done: int) -> None:
            if saves_due is not None:
                saves_due(steps_done)
            cuda_warnings[steps_done - 1] = sum("synchron" in str(w.message) for w in caught)
            caught.clear()
            prof.step()
        train_one_epoch(state, batches[2:2 + 2 * steps], device, config, after_step=after_step,
                        micro_slots=[0, 1])
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    counts = _tally(prof, steps, config.train.log_every_steps, cuda_warnings[:steps], device)
    return {**counts, "save_schedule_counted": saves_due is not None}


def _tally(prof, steps: int, log_every: int, cuda_warnings: list[int],
           device: torch.device) -> dict:
    """Per-step sync counts from the profile: ops by name, and device-to-host copies on CUDA."""
    events = prof.events()
    starts = sorted(e.time_range.start for e in events if e.name.startswith("ProfilerStep"))
    per_step = [collections.Counter() for _ in starts]
    for event in events:
        copy_to_host = "Memcpy DtoH" in event.name
        if event.name in SYNC_OPS or copy_to_host:
            step = _step_of(event, starts)
            if step is not None:
                per_step[step]["copy_to_host" if copy_to_host else event.name] += 1
    per_step = per_step[:steps]  # the last range is the epoch's end, not a step
    logging = [s for s in range(steps) if s % log_every == 0]
    outside = [sum(per_step[s].values()) for s in range(steps) if s not in logging]
    return {"device": device.type, "steps": steps, "logging_steps": logging,
            "syncs_per_step": [sum(c.values()) for c in per_step],
            "syncs_by_op_per_step": [dict(c) for c in per_step],
            "syncs_outside_logging_steps": sum(outside),
            "syncs_at_logging_steps": sum(sum(per_step[s].values()) for s in logging),
            "cuda_sync_warnings_per_step": cuda_warnings if device.type == "cuda" else None}


def main() -> None:
    """Count every variant and write results/host_syncs.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--px", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", help="result path (default benchmarks/results/host_syncs.json)")
    args = parser.parse_args()
    from benchmarks.results import write_result
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures, details = {}, {}
    for name, overrides in VARIANTS.items():
        config = sync_config(args.px, args.micro_batch, 4, *overrides)
        counts = count_host_syncs(config, args.steps, device)
        figures[f"{name}_syncs_outside_logging_steps"] = counts["syncs_outside_logging_steps"]
        figures[f"{name}_syncs_at_logging_steps"] = counts["syncs_at_logging_steps"]
        details[name] = counts
        print(name, counts["syncs_per_step"], flush=True)
    write_result("host_syncs", figures, path=args.out, context={"per_step": details})


if __name__ == "__main__":
    main()
