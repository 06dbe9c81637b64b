"""Timing for benchmarks/gpu_throughput.py: steps timed with CUDA events after a synchronize, the
host's own time per step beside the device's, and time limits that cut a section short.

GPU work is asynchronous: a host clock read while kernels are still queued undercounts them. A
`StepTimer` is the training loop's `after_step` hook: it records a CUDA event (and the host
clock) after every optimizer step, ends the loop (`EnoughSteps`) once the timed window is long
enough, and `result()` synchronizes before reading the events, so every queued kernel of the
timed steps is inside the figure. Images/s come from the device's elapsed time between the event
after the last warm-up step and the event after the last timed step. On CPU the host clock is
the device's.
"""
from __future__ import annotations

import contextlib
import signal
import statistics
import time
from typing import Iterable, Iterator

import torch


class EnoughSteps(Exception):
    """Raised by a StepTimer to end the training loop once its timed window is complete."""


class SectionTimeout(Exception):
    """A section ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM; Python code only, so a
    long C++ call ends first)."""
    def expire(signum, frame):
        raise SectionTimeout(f"past its {seconds:.0f} s limit")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    """Wait for every queued kernel (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """`after_step` hook: `warmup` untimed steps, then at least `min_steps` steps and `min_s`
    seconds timed (at most `max_steps`), then EnoughSteps."""

    def __init__(self, device: torch.device, warmup: int, min_steps: int, min_s: float,
                 max_steps: int = 10**9):
        self.device, self.warmup, self.min_steps, self.min_s = device, warmup, min_steps, min_s
        self.max_steps = max_steps
        self.host_s: list[float] = []
        self.events: list = []

    def __call__(self, steps_done: int) -> None:
        """Mark the end of a step; end the loop once the timed window is complete."""
        self.host_s.append(time.perf_counter())
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        timed = len(self.host_s) - 1 - self.warmup
        if timed >= self.max_steps or (timed >= self.min_steps and
                                       self.host_s[-1] - self.host_s[self.warmup] >= self.min_s):
            raise EnoughSteps

    @property
    def timed_steps(self) -> int:
        """Steps inside the timed window so far."""
        return max(len(self.host_s) - 1 - self.warmup, 0)

    def result(self, images_per_step: int) -> dict:
        """Images/s over the timed window (device time), median host and device ms per step."""
        synchronize(self.device)
        steps = self.timed_steps
        if steps < 1:
            raise RuntimeError(f"no timed step: {len(self.host_s)} steps, {self.warmup} warm-up")
        window = slice(self.warmup, self.warmup + steps + 1)
        host = self.host_s[window]
        host_ms = [1000 * (b - a) for a, b in zip(host, host[1:])]
        if self.events:
            marks = self.events[window]
            device_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        else:
            device_ms = host_ms
        seconds = sum(device_ms) / 1000
        return {"images_per_s": steps * images_per_step / seconds, "timed_steps": steps,
                "timed_s": seconds, "host_ms_per_step": statistics.median(host_ms),
                "device_ms_per_step": statistics.median(device_ms)}


class WaitClock:
    """Wraps a batch iterator and adds up the seconds spent waiting for it (data wait)."""

    def __init__(self, batches: Iterable):
        self.batches, self.wait_s, self.marks = batches, 0.0, []

    def __iter__(self):
        iterator = iter(self.batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            end = time.perf_counter()
            self.wait_s += end - start
            self.marks.append((start, end))
            yield batch

    def wait_between(self, start_s: float, end_s: float) -> float:
        """Seconds waited for batches inside [start_s, end_s] of the host clock."""
        return sum(max(0.0, min(b, end_s) - max(a, start_s)) for a, b in self.marks)
