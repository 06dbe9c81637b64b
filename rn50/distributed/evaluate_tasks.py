"""The evaluate job's shards as Ray tasks (`rn50-evaluate --workers N`, N > 1).

Each task runs `rn50.serve.evaluate.evaluate_shard_job` (plain PyTorch) on a local Ray, or on the
cluster in RAY_ADDRESS (e.g. under `ray job submit`); the counts the shards return add up exactly.
"""
from __future__ import annotations

import ray

from rn50.distributed.ray_setup import init_ray
from rn50.serve.evaluate import EvalSpec, ShardMap, ShardResult, evaluate_shard_job


def ray_map(cpus: float, gpus: float) -> ShardMap:
    """A shard mapper that runs each shard as a Ray task with `cpus` CPUs and `gpus` GPUs."""
    init_ray()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(evaluate_shard_job)

    def run(spec: EvalSpec, shards: list[tuple[int, int]]) -> list[ShardResult]:
        return ray.get([task.remote(spec, shard, count) for shard, count in shards])
    return run
