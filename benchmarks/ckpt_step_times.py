"""Checkpoint stall as the training loop feels it: step times of a real 2-worker Ray Train run
with its checkpoints going to the local S3 server (SeaweedFS), split into the steps that save a
checkpoint, the steps that run while its upload is in flight, and the rest.

    python -m benchmarks.ckpt_step_times --quick   # 40 timed steps, a checkpoint every 10 (~2 min)
    python -m benchmarks.ckpt_step_times           # 90 timed steps, a checkpoint every 15 (~4 min)
    python -m benchmarks.run --ckpt-steps          # the same (quick or not), into run.py's JSON

Each worker runs the project's `rn50.core.engine.train_one_epoch` on ResNet-50 (demo recipe: 10
classes, 32 px, global batch 64 = 32 per worker, 1 thread each) over in-memory batches, and at
the due steps does what the training worker does: `TrainingState.snapshot` (RNG all-gather +
state), then `rn50.distributed.reporting.report` (serialise + SHA-256 on rank 0, `ray.train.report`
with the ASYNC upload through `rn50.io.checkpoints.upload_with_retries`). `report`'s
`on_upload` observer timestamps each upload, so a step can be classed as "upload in flight" from
when it ran, not from a guess.
A step's time runs from the end of the previous step's hook to the end of its own, so a saving
step includes its save. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.results import write_result

REPO = Path(__file__).resolve().parents[1]

SIZES = {"quick": {"warmup_steps": 5, "timed_steps": 40, "every_steps": 10},
         "full": {"warmup_steps": 5, "timed_steps": 90, "every_steps": 15}}
NUM_WORKERS, BATCH_PER_WORKER, IMAGE_PX = 2, 32, 32


def worker_loop(loop_config: dict) -> None:
    """The train_loop_per_worker: warm-up steps, then timed steps that checkpoint when due."""
    import ray.train
    import torch
    import torch.distributed as dist

    from rn50.config import Config
    from rn50.core.engine import build_optimizer, train_one_epoch
    from rn50.core.model import build_model
    from rn50.core.schedule import build_scheduler
    from rn50.core.training_state import TrainingState
    from rn50.distributed.reporting import report

    config, sizes = Config.from_dict(loop_config["config"]), loop_config["sizes"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(config.model, 10))
    optimizer = build_optimizer(model, config)
    total_steps = sizes["warmup_steps"] + sizes["timed_steps"]
    scheduler = build_scheduler(optimizer, total_steps, 1, config.schedule)
    generator = torch.Generator().manual_seed(rank)
    batch = (torch.randint(0, 256, (BATCH_PER_WORKER, 3, IMAGE_PX, IMAGE_PX), dtype=torch.uint8,
                           generator=generator),
             torch.randint(0, 10, (BATCH_PER_WORKER,), generator=generator), 0)
    uploads: list[tuple[float, float]] = []
    state = TrainingState(model, optimizer, scheduler)
    steps: list[dict] = []
    mark = [time.perf_counter()]

    def after_step(steps_done: int) -> None:
        timed_index = steps_done - sizes["warmup_steps"]
        saves = timed_index > 0 and timed_index % sizes["every_steps"] == 0
        if saves:
            report({"steps_done": steps_done},
                   state.snapshot(rank, 0, steps_done, config.to_dict()), rank,
                   on_upload=lambda start_s, end_s: uploads.append((start_s, end_s)))
        now = time.perf_counter()
        if timed_index > 0:
            steps.append({"start_s": mark[0], "end_s": now, "saves": saves})
        mark[0] = now

    dist.barrier()
    mark[0] = time.perf_counter()
    train_one_epoch(state, [batch] * total_steps, torch.device("cpu"), config,
                    after_step=after_step)
    if rank == 0:  # only rank 0 uploads: let its last upload land, then write the timings
        deadline = time.monotonic() + 120
        while len(uploads) < sum(s["saves"] for s in steps) and time.monotonic() < deadline:
            time.sleep(0.2)
        Path(loop_config["out_path"]).write_text(json.dumps({"steps": steps, "uploads": uploads}))


def classify(steps: list[dict], uploads: list[tuple[float, float]]) -> dict:
    """Mean step seconds of saving steps, steps overlapping an upload, and clean steps."""
    def in_flight(step: dict) -> bool:
        return any(step["start_s"] < end and step["end_s"] > start for start, end in uploads)
    groups: dict[str, list[float]] = {"saving": [], "upload_in_flight": [], "clean": []}
    for step in steps:
        kind = "saving" if step["saves"] else "upload_in_flight" if in_flight(step) else "clean"
        groups[kind].append(step["end_s"] - step["start_s"])
    figures = {f"step_s_{kind}": statistics.mean(times) if times else None
               for kind, times in groups.items()}
    figures.update({f"steps_{kind}": len(times) for kind, times in groups.items()})
    figures["upload_s_mean"] = statistics.mean(end - start for start, end in uploads) \
        if uploads else None
    clean = figures["step_s_clean"]
    if clean and figures["step_s_saving"]:
        figures["ckpt_step_stall_s"] = figures["step_s_saving"] - clean
        figures["ckpt_step_ratio"] = figures["step_s_saving"] / clean
    if clean and figures["step_s_upload_in_flight"]:
        figures["upload_step_ratio"] = figures["step_s_upload_in_flight"] / clean
    return figures


def run_benchmark(quick: bool) -> dict:
    """Start the S3 server and a local Ray, run the 2-worker job, return the step-time figures."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rn50.distributed.ray_setup import init_ray
    from rn50.io import storage
    from rn50.config import load_config
    from rn50.io.s3 import s3_uri
    from tools.local_servers import S3Server

    sizes = SIZES["quick" if quick else "full"]
    work = Path(tempfile.mkdtemp(prefix="rn50-ckpt-steps-"))
    server = S3Server(work / "s3")
    server.start()
    os.environ.update(server.env())  # the driver and Ray's workers reach the server the same way
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    config = load_config("demo", ["train.ema_decay=0", "train.compile=false"])
    filesystem, storage_path = storage.resolve_storage(s3_uri(server.bucket, "ckpt-steps"))
    try:
        init_ray(NUM_WORKERS, exact=True)
        trainer = TorchTrainer(
            worker_loop, train_loop_config={"config": config.to_dict(), "sizes": sizes,
                                            "out_path": str(work / "steps.json")},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=NUM_WORKERS,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name="ckpt-steps", storage_path=storage_path, storage_filesystem=filesystem,
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}))
        trainer.fit()
        result = json.loads((work / "steps.json").read_text())
    finally:
        ray.shutdown()
        server.stop()
    return {**classify(result["steps"], result["uploads"]), "every_steps": sizes["every_steps"]}


def main() -> None:
    """Print the figures, then one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 timed steps instead of 90")
    figures = run_benchmark(parser.parse_args().quick)
    for key, value in figures.items():
        print(f"{key:26s} {value if value is None else round(value, 4)}")
    rounded = {k: v if v is None else round(v, 4) for k, v in figures.items()}
    print(json.dumps(rounded))
    write_result("ckpt_step_times" + ("-quick" if parser.parse_args().quick else ""), rounded)


if __name__ == "__main__":
    main()
