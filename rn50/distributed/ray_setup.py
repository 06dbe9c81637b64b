"""The one way every entrypoint connects to Ray: the cluster in RAY_ADDRESS, else a local one."""
from __future__ import annotations

import os
import re

import ray

# Ray Train's own PreemptionWatcher (an actor with max_restarts=-1) is handed the training
# workers' actor handles, and Ray's core worker logs an error for any restartable actor whose
# arguments hold a reference (ray-project/ray#53727), once per run, in red. Nothing a user can
# act on: the watcher is Ray Train's, rn50 needs it (`ray.train.get_preemption_info`), and the
# handles are to workers Ray Train restarts as a group anyway. Off the console, kept in Ray's
# log files (the controller's worker-*.err); any other actor's such line still shows.
RAY_OWN_ERROR_LINES = (re.compile(
    r"core_worker\.cc:\d+: Actor .*with class name: 'PreemptionWatcher' .*"
    r"has constructor arguments in the object store"),)


def init_ray(cpus_needed: int = 1, exact: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local Ray
    with at least `cpus_needed` CPUs (never fewer than the machine has, unless `exact`: a
    benchmark that pins what Ray may use)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # address="local": never attach to some other cluster on this machine by accident. The
        # dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
        num_cpus = cpus_needed if exact else max(cpus_needed, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=num_cpus)
    quiet_ray_own_errors()


def quiet_ray_own_errors() -> None:
    """Drop `RAY_OWN_ERROR_LINES` from the worker output Ray forwards to this driver's console."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if not printers or getattr(printers[0], "rn50_quiet", False):
        return  # log_to_driver=False, or done already

    def print_logs(data: dict, print_to_console=printers[0]) -> None:
        lines = [line for line in data["lines"]
                 if not any(pattern.search(line) for pattern in RAY_OWN_ERROR_LINES)]
        if lines:
            print_to_console({**data, "lines": lines})
    print_logs.rn50_quiet = True
    dispatcher.remove_handler("ray_print_logs")  # by the name ray.shutdown removes it by
    dispatcher.add_handler("ray_print_logs", print_logs)
