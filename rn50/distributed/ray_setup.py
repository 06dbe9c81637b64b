"""The one way every entrypoint connects to Ray: the cluster in RAY_ADDRESS, else a local one."""
from __future__ import annotations

import os

import ray


def init_ray(cpus_needed: int = 1, exact: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local Ray
    with at least `cpus_needed` CPUs (never fewer than the machine has, unless `exact`: a
    benchmark that pins what Ray may use)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # address="local": never attach to some other cluster on this machine by accident. The
    # dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
    num_cpus = cpus_needed if exact else max(cpus_needed, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus)
