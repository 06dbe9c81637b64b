"""What gradient accumulation costs: one worker training a global batch as A micro-batches (what
an elastic run does on fewer workers, `train.micro_batch_size`) against the same images as one
batch, with the project's own training step (`rn50.core.engine.train_one_epoch`), side by side.

    python -m benchmarks.accumulation                      # ResNet-50, 64 px, batch 32, on CPU
    python -m benchmarks.accumulation --px 224 --batch 64  # on a GPU machine

Each configuration trains the same `--steps` steps (after one untimed warm-up step), alternating
A = 1, 2, 4 over `--repeats` rounds; the figure per A is images/s (median over rounds) and its
ratio to A = 1. Writes benchmarks/results/accumulation.json.
"""
import argparse
import statistics
import time

import torch

from benchmarks.results import write_result
from rn50.config import load_config
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.model import build_model, place_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState

ACCUMULATIONS = (1, 2, 4)


def _micro_batches(batch: int, accumulation: int, px: int, steps: int, device) -> list:
    """`steps` global batches of random uint8 images, each cut into `accumulation` micro-batches."""
    generator = torch.Generator().manual_seed(0)
    micro = batch // accumulation
    return [(torch.randint(0, 256, (micro, 3, px, px), dtype=torch.uint8, generator=generator),
             torch.randint(0, 1000, (micro,), generator=generator), 0)
            for _ in range(steps * accumulation)]


def images_per_s(batch: int, accumulation: int, px: int, steps: int, device) -> float:
    """Images/s of `steps` optimizer steps of `batch` images as `accumulation` micro-batches."""
    config = load_config("demo", ["data.num_classes=1000", f"train.global_batch_size={batch}",
                                  f"train.micro_batch_size={batch // accumulation}",
                                  "scaling.num_workers=1", "train.log_every_steps=100000"])
    torch.manual_seed(0)
    model = place_model(build_model(config.model, 1000), device, config.model.channels_last)
    optimizer = build_optimizer(model, config)
    state = TrainingState(model, optimizer, build_scheduler(optimizer, steps + 1, 1,
                                                            config.schedule))
    slots = list(range(accumulation))
    warm = _micro_batches(batch, accumulation, px, 1, device)
    train_one_epoch(state, warm, device, config, micro_slots=slots)
    timed = _micro_batches(batch, accumulation, px, steps, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(state, timed, device, config, micro_slots=slots)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    """Measure every accumulation in alternating rounds; print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds = {a: [] for a in ACCUMULATIONS}
    for _ in range(args.repeats):  # alternating, so drifts in machine load hit every A alike
        for accumulation in ACCUMULATIONS:
            rounds[accumulation].append(
                images_per_s(args.batch, accumulation, args.px, args.steps, device))
    speed = {a: statistics.median(values) for a, values in rounds.items()}
    figures = {}
    for accumulation in ACCUMULATIONS:
        figures[f"images_per_s_accumulation_{accumulation}"] = round(speed[accumulation], 2)
        ratio = speed[accumulation] / speed[1]
        figures[f"ratio_accumulation_{accumulation}_vs_1"] = round(ratio, 3)
        print(f"accumulation {accumulation} (micro-batch {args.batch // accumulation}): "
              f"{speed[accumulation]:.1f} img/s, {ratio:.3f}x of one batch")
    write_result("accumulation", figures, context={
        "setup": {"model": "resnet50", "px": args.px, "global_batch": args.batch,
                  "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                  "device": device.type}})


if __name__ == "__main__":
    main()
