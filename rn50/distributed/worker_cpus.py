"""A training worker's torch threads and loader workers, `auto` ones sized from its node's CPUs.

The node's CPUs are the fewer of what this process may run on (`os.sched_getaffinity`) and what
Ray counts on the node; its GPUs are Ray's count on the node (torch sees only the worker's own,
through CUDA_VISIBLE_DEVICES). The arithmetic is `rn50.data.cpu_budget.plan_cpus`.
"""
from __future__ import annotations

import logging
import os

import ray
import ray.train
import torch

from rn50.config import Config
from rn50.data.cpu_budget import CpuPlan, plan_cpus

logger = logging.getLogger(__name__)


def node_cpus_and_gpus() -> tuple[int, int]:
    """(CPUs, GPUs) of the node this process runs on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    node_id = ray.get_runtime_context().get_node_id()
    resources = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == node_id),
                     {})
    counted = int(resources.get("CPU", 0))
    cpus = min(usable or 1, counted) if counted > 0 else (usable or 1)
    return cpus, int(resources.get("GPU", 0))


def resolve_cpu_plan(config: Config, device: torch.device) -> CpuPlan:
    """This worker's threads and loader workers (`auto` resolved; the config keeps `auto`, so
    checkpoints and MLflow hold what the user set), said once on the console by each rank."""
    node_cpus, node_gpus = node_cpus_and_gpus()
    plan = plan_cpus(config.train.torch_threads, config.data.loader_workers, node_cpus,
                     node_gpus, config.scaling.cpus_per_worker,
                     trains_on_gpu=device.type == "cuda")
    rank = ray.train.get_context().get_world_rank()
    say = logger.warning if plan.oversubscribed else logger.info
    say("[rn50 rank%d] cpus: %s", rank, plan.line())
    return plan
