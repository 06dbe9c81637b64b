"""The function Ray Train ships to its controller and workers. Ray unpickles it in the controller
too, by importing its module: kept apart from `worker.py`, it lets the controller start without
importing torch, torchvision and MLflow (seconds of CPU on a small head), while each worker
imports the training code where it runs."""
from __future__ import annotations

from rn50.distributed.contexts import RunContext


def train_loop_per_worker(run: RunContext) -> None:
    """Run `rn50.distributed.worker.train_loop_per_worker` in this Ray Train worker."""
    from rn50.distributed.worker import train_loop_per_worker as train
    train(run)
