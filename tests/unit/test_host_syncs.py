"""A training step makes the host wait for the device only when it writes a progress line.

Counted with torch.profiler on CPU (benchmarks/host_syncs.py says which ops count and why). Before
issue 24 normalize built its mean/std from host data for every micro-batch and the minutes-based
save schedule built a tensor and read it back after every step: 6 syncs a step here (run against
that code, this test failed with [6, 6, 6]); a regression of either turns it red.
"""
import json

import torch

from benchmarks.host_syncs import count_host_syncs, sync_config
from benchmarks.results import write_result


def test_no_host_sync_outside_the_logging_steps(tmp_path):
    config = sync_config(32, 2, 4)  # EMA, every_minutes, 2 micro-batches a step, NHWC batches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4x faster than 2 threads on a busy 2-core machine
    try:
        counts = count_host_syncs(config, steps=5, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert counts["logging_steps"] == [0, 4]
    per_step = counts["syncs_per_step"]
    assert [per_step[s] for s in (1, 2, 3)] == [0, 0, 0], counts["syncs_by_op_per_step"]
    # The counter sees a sync where there is one: the progress line reads the loss.
    assert all(per_step[s] >= 1 for s in (0, 4))
    assert counts["syncs_by_op_per_step"][4].get("aten::_local_scalar_dense", 0) >= 1
    path = write_result("host_syncs", {"default_syncs_outside_logging_steps":
                                       counts["syncs_outside_logging_steps"]},
                        path=tmp_path / "host_syncs.json", context={"per_step": counts})
    assert json.loads(path.read_text())["per_step"]["syncs_per_step"] == per_step
