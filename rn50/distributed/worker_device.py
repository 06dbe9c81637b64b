"""Which device a Ray Train worker trains on, said once per node; DDP over it.

A node may advertise GPUs to Ray that torch cannot use (an AMI driver older than torch's CUDA, a
container without the NVIDIA runtime, a CPU build of torch): a run that asked for GPUs stops
there with `DeviceError` (exit code 6, never retried) instead of training on the CPU at GPU
prices, unless `scaling.cpu_stands_in_for_gpu` (the rehearsal's fake GPU nodes).
"""
from __future__ import annotations

import logging
import socket

import ray
import ray.train
import torch
import torch.distributed as dist

from rn50.config import Config
from rn50.core import device_report
from rn50.distributed.contexts import RunContext
from rn50.distributed.cost import NODE_GROUP_LABEL
from rn50.errors import DeviceError
from rn50.io import pricing

logger = logging.getLogger(__name__)


def pick_device(config: Config) -> torch.device:
    """The GPU Ray gave this worker; the CPU when the run asked for none. A run that asked for
    GPUs on a node where torch sees none (an old driver, a container without the NVIDIA runtime,
    a CPU build of torch) stops here, before its first step, unless the config says the CPU may
    stand in (rehearsals on fake GPU nodes)."""
    if not config.scaling.use_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return ray.train.torch.get_device()
    where = node_description(config)
    if not config.scaling.cpu_stands_in_for_gpu:
        raise DeviceError(device_report.missing_gpu_message(where))
    if ray.train.get_context().get_local_rank() == 0:
        logger.warning("[rn50] training on the CPU of %s, which advertises GPUs torch cannot see: "
                       "scaling.cpu_stands_in_for_gpu=true (a rehearsal)", where)
    return torch.device("cpu")


def node_description(config: Config) -> str:
    """`node 1a2b...9f (gpu.a100x8.spot, p4d.24xlarge) on host ip-10-0-0-5`."""
    context = ray.get_runtime_context()
    node_type = context.get_node_labels().get(NODE_GROUP_LABEL, "")
    kind = ", ".join(filter(None, [node_type or "no node type",
                                   pricing.instance_type_of(node_type, config.cost)]))
    return f"node {context.get_node_id()} ({kind}) on host {socket.gethostname()}"


def report_device(run: RunContext, device: torch.device, rank: int) -> None:
    """Each node's first worker says once what it trains on: console and an MLflow tag."""
    if ray.train.get_context().get_local_rank() != 0:
        return
    node = ray.get_runtime_context().get_node_id()[:8]
    line = device_report.describe(device).line()
    logger.info("[rn50 rank%d] node-%s device: %s", rank, node, line)
    run.tracker.set_tags({f"device/node-{node}": line})


def wrap_ddp(model, device: torch.device):
    """DDP over NCCL when torch sees a GPU, else over the gloo group Ray set up."""
    if device.type != "cuda":
        return torch.nn.parallel.DistributedDataParallel(model)
    # Ray's default group is gloo (see build_trainer), so gradients get their own NCCL group.
    nccl = dist.new_group(backend="nccl")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index],
                                                     process_group=nccl)
