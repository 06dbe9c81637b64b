"""Ray Train overhead: images/s of the project's training step through `TorchTrainer` against the
same step in a plain PyTorch DDP loop (torch.multiprocessing spawn + gloo), same everything else.

    python -m benchmarks.ray_overhead --quick      # 20 timed steps, 2 repeats per side (~2-3 min)
    python -m benchmarks.ray_overhead              # 60 timed steps, 3 repeats per side (~6 min)
    python -m benchmarks.ray_overhead --workers 1  # one worker: a core left to Ray's processes
    python -m benchmarks.run --ray-overhead        # the same (full), into run.py's JSON line

Both sides run `worker_body`: the `demo` recipe (digits as 32 px JPEGs, ResNet-50, global batch
64 = 32 per worker, 2 workers x 1 thread), DDP over gloo, the project's optimizer, scheduler,
loader and `rn50.engine.train_one_epoch`. Warm-up steps are excluded; the timed region is
barrier -> N steps -> end, its wall time taken as the max over ranks. Nothing Ray-specific runs
inside it (the project's loop calls Ray only at checkpoints, none per step), so the ratio is the
per-step cost of running under Ray: its processes beside the workers, its worker setup, hooks.
The sides alternate (plain, ray, plain, ray, ...) and each side's median is reported. Ray is
started (`rn50.distributed.ray_setup.init_ray`, as a real run does: dashboard on) and shut down
around every Ray repeat, so its daemons do not slow the plain runs. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.results import write_result
from rn50.config import Config, load_config
from rn50.data.loaders import build_datasets, build_loader
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.model import build_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState

REPO = Path(__file__).resolve().parents[1]

NUM_WORKERS = 2
THREADS_PER_WORKER = 1
GLOBAL_BATCH = 64
SIZES = {"quick": {"warmup_steps": 5, "timed_steps": 20, "repeats": 2},
         "full": {"warmup_steps": 5, "timed_steps": 60, "repeats": 3}}


def bench_config(data_root: str, num_workers: int = NUM_WORKERS) -> Config:
    """The demo recipe as both sides train it: N workers x 1 thread, global batch 64, no compile."""
    return load_config("demo", [f"data.root={data_root}",
                                f"train.global_batch_size={GLOBAL_BATCH}",
                                f"scaling.num_workers={num_workers}",
                                f"train.torch_threads={THREADS_PER_WORKER}", "train.compile=false",
                                "train.ema_decay=0"])


def _endless_batches(train_set, config: Config, rank: int, world_size: int):
    """This rank's training batches, epoch after epoch, as the project's loader deals them."""
    batch_per_worker = config.train.global_batch_size // world_size
    for epoch in itertools.count():
        yield from build_loader(train_set, batch_per_worker, rank=rank, world_size=world_size,
                                seed=config.train.seed, epoch=epoch, train=True,
                                loader_workers=config.data.loader_workers)


def worker_body(config_dict: dict, warmup_steps: int, timed_steps: int) -> dict:
    """The per-worker work both sides run (process group already up): warm up, then time steps."""
    config = Config.from_dict(config_dict)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(config.train.torch_threads)
    device = torch.device("cpu")
    train_set, _, _ = build_datasets(config.data)  # the parent wrote the files; this only lists
    torch.manual_seed(config.train.seed)
    model = torch.nn.parallel.DistributedDataParallel(
        build_model(config.model, config.data.num_classes).to(device))
    optimizer = build_optimizer(model, config)
    steps_per_epoch = len(train_set) // config.train.global_batch_size
    # Enough epochs that the schedule never runs past its end during the benchmark.
    epochs = math.ceil((warmup_steps + timed_steps) / steps_per_epoch) + 1
    scheduler = build_scheduler(optimizer, steps_per_epoch, epochs, config.schedule)
    batches = _endless_batches(train_set, config, rank, world_size)
    state = TrainingState(model, optimizer, scheduler)
    train_one_epoch(state, itertools.islice(batches, warmup_steps), device, config)
    dist.barrier()  # every rank starts the clock together
    start_s = time.perf_counter()
    stats = train_one_epoch(state, itertools.islice(batches, timed_steps), device, config)
    elapsed = torch.tensor([time.perf_counter() - start_s], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return {"images": stats.images, "in_worker_s": elapsed.item(), "loss": stats.loss,
            "images_per_s": stats.images / elapsed.item()}


def _plain_worker(rank: int, port: int, config_dict: dict, sizes: dict, out_path: str) -> None:
    """A spawned process of the plain side: gloo group, `worker_body`, rank 0 writes the result."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config_dict["scaling"]["num_workers"])
    try:
        result = worker_body(config_dict, sizes["warmup_steps"], sizes["timed_steps"])
        if rank == 0:
            Path(out_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_plain(config: Config, sizes: dict) -> dict:
    """One plain-PyTorch run: spawn a process per worker, return rank 0's figures + total wall."""
    # Inherited by the spawned interpreters before they import torch, as Ray's runtime_env does.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS_PER_WORKER)
    with tempfile.TemporaryDirectory(prefix="rn50-plain-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        start_s = time.perf_counter()
        mp.spawn(_plain_worker, args=(_free_port(), config.to_dict(), sizes, out_path),
                 nprocs=config.scaling.num_workers, join=True)
        result = json.loads(Path(out_path).read_text())
    return {**result, "total_wall_s": time.perf_counter() - start_s}


def _ray_worker(loop_config: dict) -> None:
    """The Ray Train side's train_loop_per_worker: `worker_body`, rank 0 writes the result."""
    result = worker_body(loop_config["config"], loop_config["warmup_steps"],
                         loop_config["timed_steps"])
    # A file, as on the plain side: Train V2's Result.metrics only carries checkpointed reports.
    if dist.get_rank() == 0:
        Path(loop_config["out_path"]).write_text(json.dumps(result))


def run_ray(config: Config, sizes: dict) -> dict:
    """One Ray Train run, Ray started for it and shut down after; rank 0's figures + total wall."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rn50.distributed.ray_setup import init_ray
    threads = str(THREADS_PER_WORKER)
    # Ray's processes inherit this environment: they must import `benchmarks.ray_overhead` to
    # unpickle `_ray_worker` when this module was imported (from run.py) rather than run.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    start_s = time.perf_counter()
    init_ray(config.scaling.num_workers * config.scaling.cpus_per_worker)  # as a real run does
    init_s = time.perf_counter() - start_s
    storage = tempfile.mkdtemp(prefix="rn50-ray-overhead-")
    try:
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"config": config.to_dict(), **sizes,
                                            "out_path": os.path.join(storage, "result.json")},
            torch_config=TorchConfig(backend="gloo"),  # as rn50.driver.build_trainer
            scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers,
                                                   use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name="ray-overhead", storage_path=storage,
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": threads,
                                                 "MKL_NUM_THREADS": threads}}))
        trainer.fit()
        result = json.loads(Path(storage, "result.json").read_text())
        total_wall_s = time.perf_counter() - start_s
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return {**result, "total_wall_s": total_wall_s, "ray_init_s": init_s}


def _read_proc_stats() -> dict[tuple[int, int], tuple[int, float]]:
    """{(pid, start tick): (parent pid, CPU seconds used)} for every process now alive."""
    ticks_per_s, stats = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()  # the name may hold spaces
        except OSError:
            continue  # exited while we looked
        # After the name: state, ppid, ..., utime (12th), stime (13th), ..., start time (20th).
        cpu_ticks = int(fields[11]) + int(fields[12])
        stats[(int(entry), int(fields[19]))] = (int(fields[1]), cpu_ticks / ticks_per_s)
    return stats


class ProcessTreeCpu:
    """CPU seconds of this process and every descendant (spawned workers, Ray's daemons and
    workers), sampled from /proc every `period_s`, so the rest of the machine's CPU use over the
    same window (the `/proc/stat` total of benchmarks/run.py's `cpu_seconds`) is other people's."""

    def __init__(self, period_s: float = 0.25):
        self.period_s, self.cpu_s, self._stop = period_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        stats, me = _read_proc_stats(), os.getpid()
        ours_by_pid = {pid for pid, _ in self.cpu_s} | {me}
        grew = True
        while grew:  # descendants are found level by level; orphans stay known by (pid, start)
            new = {key for key, (ppid, _) in stats.items()
                   if ppid in ours_by_pid and key[0] not in ours_by_pid}
            ours_by_pid |= {pid for pid, _ in new}
            grew = bool(new)
        for key, (_, cpu_s) in stats.items():
            if key[0] in ours_by_pid and key[0] != me:
                self.cpu_s[key] = cpu_s

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "ProcessTreeCpu":
        from benchmarks.pipeline import cpu_seconds  # the /proc/stat reader run.py uses
        self._cpu_seconds = cpu_seconds
        self._sample()
        self.before_s = dict(self.cpu_s)  # children alive already (none, normally) count from here
        self.machine_s, self.own_s, self.start_s = *cpu_seconds(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self.start_s
        machine_s = self._cpu_seconds()[0] - self.machine_s
        children_s = sum(cpu_s - self.before_s.get(key, 0.0) for key, cpu_s in self.cpu_s.items())
        self.tree_s = (time.process_time() - self.own_s) + children_s
        # A child that exits between samples loses up to `period_s` of CPU here, which errs
        # towards blaming others; the figure is a load indicator, not an exact account.
        self.others_s = max(0.0, machine_s - self.tree_s)


def prepare_data(data_root: str, num_workers: int) -> Config:
    """Write the digits JPEGs once, before any timing, so neither side pays for it."""
    config = bench_config(data_root, num_workers)
    build_datasets(config.data)
    return config


def _one_run(side: str, config: Config, sizes: dict) -> dict:
    """One run of `side` with the CPU use of our process tree and of everyone else beside it."""
    with ProcessTreeCpu() as cpu:
        result = (run_plain if side == "plain" else run_ray)(config, sizes)
    return result | {"own_cores": cpu.tree_s / cpu.wall_s, "other_cores": cpu.others_s / cpu.wall_s}


def measure(sizes: dict, data_root: str, log=print, num_workers: int = NUM_WORKERS) -> dict:
    """Alternate plain and Ray runs `repeats` times each; per side the runs and their medians."""
    config = prepare_data(data_root, num_workers)
    runs: dict[str, list[dict]] = {"plain": [], "ray": []}
    for repeat in range(sizes["repeats"]):
        for side in runs:  # interleaved, so drift in machine load hits both sides alike
            run = _one_run(side, config, sizes)
            runs[side].append(run)
            log(f"repeat {repeat + 1} {side:<5}: {run['images_per_s']:.1f} images/s in-worker "
                f"({run['images']} images in {run['in_worker_s']:.2f} s), total "
                f"{run['total_wall_s']:.1f} s, others {run['other_cores']:.2f} cores")
    medians = {side: {key: statistics.median(r[key] for r in side_runs)
                      for key in ("images_per_s", "in_worker_s", "total_wall_s", "own_cores",
                                  "other_cores")}
               for side, side_runs in runs.items()}
    return {"runs": runs, "medians": medians,
            "ray_overhead_ratio": medians["ray"]["images_per_s"] / medians["plain"]["images_per_s"],
            "total_wall_ratio": medians["plain"]["total_wall_s"] / medians["ray"]["total_wall_s"]}


def print_table(result: dict) -> None:
    """One row per side: median in-worker images/s, seconds, total wall time, CPU use."""
    print(f"{'side':<7}{'images/s':>10}{'ratio':>7}{'timed_s':>9}{'spread_s':>10}{'total_s':>9}"
          f"{'own_cores':>11}{'others_cores':>14}")
    plain_per_s = result["medians"]["plain"]["images_per_s"]
    for side, row in result["medians"].items():
        spread_s = [r["in_worker_s"] for r in result["runs"][side]]
        print(f"{side:<7}{row['images_per_s']:>10.1f}{row['images_per_s'] / plain_per_s:>7.3f}"
              f"{row['in_worker_s']:>9.2f}{max(spread_s) - min(spread_s):>10.2f}"
              f"{row['total_wall_s']:>9.1f}{row['own_cores']:>11.2f}{row['other_cores']:>14.2f}")


def summary(result: dict, sizes: dict, load_before: float) -> dict:
    """The figures as one flat, rounded dict (the JSON line; benchmarks/run.py merges it)."""
    plain, ray_ = result["medians"]["plain"], result["medians"]["ray"]
    return {"ray_overhead_ratio": round(result["ray_overhead_ratio"], 3),
            "ray_images_per_s": round(ray_["images_per_s"], 1),
            "plain_images_per_s": round(plain["images_per_s"], 1),
            "ray_total_wall_s": round(ray_["total_wall_s"], 1),
            "plain_total_wall_s": round(plain["total_wall_s"], 1),
            "ray_total_wall_ratio": round(result["total_wall_ratio"], 3),
            "ray_overhead_timed_steps": sizes["timed_steps"],
            "ray_overhead_repeats": sizes["repeats"],
            "ray_overhead_workers": sizes["num_workers"],
            "ray_overhead_load_avg_before": round(load_before, 2),
            "ray_overhead_other_cores": round(max(plain["other_cores"], ray_["other_cores"]), 2)}


def run_benchmark(quick: bool, repeats: int = 0, timed_steps: int = 0,
                  num_workers: int = NUM_WORKERS) -> dict:
    """Measure at the quick or full sizes (optionally overridden); print and return the summary."""
    sizes = dict(SIZES["quick" if quick else "full"])
    sizes["repeats"] = repeats or sizes["repeats"]
    sizes["timed_steps"] = timed_steps or sizes["timed_steps"]
    sizes["num_workers"] = num_workers
    load_before = os.getloadavg()[0]
    print(f"Ray overhead: demo recipe, ResNet-50 @ 32 px, {num_workers} workers x "
          f"{THREADS_PER_WORKER} thread, global batch {GLOBAL_BATCH}, {sizes['warmup_steps']} "
          f"warm-up + {sizes['timed_steps']} timed steps, {sizes['repeats']} repeats per side "
          f"(alternating); {os.cpu_count()} cores; load avg {load_before:.2f}", flush=True)
    data_root = tempfile.mkdtemp(prefix="rn50-ray-overhead-data-")
    try:
        result = measure(sizes, os.path.join(data_root, "digits"),
                         log=lambda line: print(line, flush=True), num_workers=num_workers)
    finally:
        shutil.rmtree(data_root, ignore_errors=True)
    print_table(result)
    print("images/s: in-worker throughput (timed steps, slowest rank); total_s: launch to results"
          " (Ray: ray.init + fit; plain: spawn + join); own/others: cores our process tree / the "
          "rest of the machine kept busy")
    return summary(result, sizes, load_before)


def main() -> None:
    """Parse options, run the comparison, print the table and a last JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 timed steps, 2 repeats per side")
    parser.add_argument("--repeats", type=int, default=0, help="runs per side (default 2 / 3)")
    parser.add_argument("--timed-steps", type=int, default=0,
                        help="timed steps (default 20 / 60)")
    parser.add_argument("--workers", type=int, default=NUM_WORKERS,
                        help=f"training workers x 1 thread (default {NUM_WORKERS}: every core; "
                             "1 leaves a core to Ray's own processes, as a GPU node has)")
    args = parser.parse_args()
    figures = run_benchmark(args.quick, args.repeats, args.timed_steps, args.workers)
    print(json.dumps(figures))
    suffix = ("-quick" if args.quick else "") + \
        (f"-workers{args.workers}" if args.workers != NUM_WORKERS else "")
    write_result(f"ray_overhead{suffix}", figures)


if __name__ == "__main__":
    main()
