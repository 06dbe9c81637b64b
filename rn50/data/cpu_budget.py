"""How many torch threads and loader worker processes one training worker runs: `auto` sizes them
from the CPUs it has, so that a node's training processes and their loaders do not ask for more
CPUs than the node has (4 threads + 10 loaders per GPU on a p4d's 12 vCPUs per GPU did).

Pure arithmetic; the worker gathers the node's CPUs and GPUs (rn50.distributed.worker_cpus).
"""
from __future__ import annotations

from dataclasses import dataclass

from rn50.config_sections import AUTO


@dataclass(frozen=True)
class CpuPlan:
    """What one training worker runs on its CPUs."""
    torch_threads: int
    loader_workers: int
    cpus: int
    """The CPUs the worker's share is (see `worker_cpu_share`)."""
    basis: str
    """Where `cpus` comes from, for the log line: `96 CPUs / 8 GPUs on this node`."""

    @property
    def oversubscribed(self) -> bool:
        """More busy threads (torch's) and processes (loaders) than the worker has CPUs."""
        return self.torch_threads + self.loader_workers > self.cpus

    def line(self) -> str:
        """`torch_threads=1 loader_workers=10 on 12 CPUs (96 CPUs / 8 GPUs on this node)`."""
        warning = (": more threads and processes than CPUs, set train.torch_threads=auto "
                   "data.loader_workers=auto") if self.oversubscribed else ""
        return (f"torch_threads={self.torch_threads} loader_workers={self.loader_workers} "
                f"on {self.cpus} CPUs ({self.basis}){warning}")


def worker_cpu_share(node_cpus: int, node_gpus: int, reserved_cpus: int,
                     trains_on_gpu: bool) -> tuple[int, str]:
    """The CPUs one training worker may keep busy, and why. On a GPU node: the node's CPUs per
    GPU, since every GPU may carry a training worker (Ray's `scaling.cpus_per_worker` only places
    workers, it does not pin CPUs). On the CPU: what Ray reserved for it, at most the node's."""
    node_cpus = max(1, node_cpus)
    if trains_on_gpu and node_gpus >= 1:
        return max(1, node_cpus // node_gpus), f"{node_cpus} CPUs / {node_gpus} GPUs on this node"
    share = max(1, min(reserved_cpus, node_cpus))
    return share, f"{reserved_cpus} reserved by Ray of {node_cpus} CPUs on this node"


def plan_cpus(torch_threads: int | str, loader_workers: int | str, node_cpus: int,
              node_gpus: int, reserved_cpus: int, trains_on_gpu: bool) -> CpuPlan:
    """Resolve `auto` threads and loader workers for one worker; numbers pass through unchanged.

    On a GPU the step runs on the device: 1 torch thread, and every CPU but that one and one
    more (the pin-memory, NCCL, checkpoint-writer and Ray threads of the training process)
    decodes images (p4d: 12 CPUs -> 1 + 10; p5: 24 -> 1 + 22; g5.2xlarge: 8 -> 1 + 6).
    On the CPU the step is the work: every CPU is a torch thread and images are decoded in the
    training process between steps (no loader processes competing with the step's threads)."""
    cpus, basis = worker_cpu_share(node_cpus, node_gpus, reserved_cpus, trains_on_gpu)
    if trains_on_gpu:
        threads = 1 if torch_threads == AUTO else int(torch_threads)
        loaders = max(0, cpus - threads - 1) if loader_workers == AUTO else int(loader_workers)
    else:
        loaders = 0 if loader_workers == AUTO else int(loader_workers)
        threads = max(1, cpus - loaders) if torch_threads == AUTO else int(torch_threads)
    return CpuPlan(threads, loaders, cpus, basis)
