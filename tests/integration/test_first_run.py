"""The first real run, rehearsed on the fake multi-node cluster with the cloud's own faults, set
from outside the product (tests/integration/rehearsal_provider.py): every launch of a spot A100
node is refused as EC2 refuses one it has no capacity for, and a spot A10G node takes half a
minute to come up (a cold node booting and installing). One cluster for the module; jobs go in with
`ray job submit`, as docs/aws.md has it.

- A cold node is waited for by what it is doing and used, not abandoned on a wall clock.
- A GPU run on a node whose GPU torch cannot see stops at once (exit 6) naming the node, its
  instance type and what to fix, unless the rehearsal's `scaling.cpu_stands_in_for_gpu` is on;
  a wrong data set in the workers ends the run at once (exit 2), never retried.
- A run typed like imagenet_90ep (the A100 node types) falls back from refused spot to on-demand
  within seconds, is priced from the one price table (non-zero `cost/usd`), and its budget stops
  it at an epoch end before the next epoch would cross it.
"""
import json
import re
import subprocess
import time
import uuid

import pytest
from mlflow import MlflowClient

from tests.integration.fake_cluster import RAY, REPO, FakeCluster
from tests.integration.jobs import small

pytestmark = pytest.mark.integration
NODE_DELAY_S = 30  # the A10G spot node's launch (a cold node booting): 3x the test's spot_wait_s
PRICE_PER_H = {"ray.head.default": 0.384, "gpu.a100x8.ondemand": 21.96}  # rn50/node_types.yaml


@pytest.fixture(scope="module")
def cluster(module_tmp):
    with FakeCluster(
            head_env={"MLFLOW_TRACKING_URI": f"sqlite:///{module_tmp / 'mlflow.db'}"},
            provider={"refuse_node_types": ["gpu.a100x8.spot"],
                      "start_delay_s": {"gpu.a10g.spot": NODE_DELAY_S}}) as started:
        yield started


def _submit(cluster, tmp_path, name: str, *args: str) -> subprocess.Popen:
    """`ray job submit ... train_full.py --recipe rehearsal ...` in the background (the CLI exits
    1 for any failed job; the entrypoint's own exit code is in its output)."""
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
               "--submission-id", f"{name}-{uuid.uuid4().hex[:6]}",
               "--entrypoint-resources", json.dumps({"head_driver": 1}), "--",
               "python", "ray_jobs/train_full.py", "--recipe", "rehearsal", "--name", name,
               "--storage", str(tmp_path / "runs"), *small(tmp_path, epochs=1), *args]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    job.launched = time.monotonic()
    return job


def _log(tmp_path) -> str:
    return (tmp_path / "job.log").read_text(errors="replace")


def _until(job, tmp_path, condition, timeout_s: float, what: str):
    """Poll `condition(log text)` until truthy; fail (killing the job) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition(_log(tmp_path))
        if found:
            return found
        if job.poll() is not None and not condition(_log(tmp_path)):
            break
        time.sleep(0.5)
    if job.poll() is None:
        job.kill()
    pytest.fail(f"waiting for {what} (job exit {job.poll()}):\n{_log(tmp_path)[-4000:]}")


def _result(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines()
                           if line.startswith("RESULT "))[len("RESULT "):])


def test_a_cold_spot_node_is_waited_for_by_its_state_and_used(cluster, tmp_path):
    # spot_wait_s is far shorter than the node's start: a clock would fall back to on-demand.
    # Red if the run abandoned the booting spot node, or waited in silence.
    job = _submit(cluster, tmp_path, "cold", "scaling.accelerator_type=A10G",
                  "scaling.num_workers=1", "scaling.prefer_spot=true", "scaling.spot_wait_s=10",
                  "scaling.start_check_s=5", "scaling.node_start_timeout_s=400")
    _until(job, tmp_path, lambda log: job.poll() is not None, 600, "the job to end")
    output = _log(tmp_path)
    assert job.returncode == 0, output[-4000:]
    waits = re.findall(r"waiting for 1 workers x \{.*\}: a gpu\.a10g\.spot node (\w+), (\S+) ",
                       output)
    assert waits, output[-4000:]
    assert "falling back" not in output, output[-4000:]
    types = {cluster.node_type(pid) for pid in cluster.worker_raylets().values()}
    assert types == {"gpu.a10g.spot"}, types
    assert _result(output)["epochs"] == 1


def test_a_gpu_run_where_torch_sees_no_gpu_stops_at_once_naming_the_node(cluster, tmp_path):
    # The A10G spot node of the test before (or a new one): it advertises a GPU torch cannot see.
    # Red if the run trained on the CPU without a word, or Ray Train restarted the workers.
    job = _submit(cluster, tmp_path, "nogpu", "scaling.accelerator_type=A10G",
                  "scaling.num_workers=1", "scaling.cpu_stands_in_for_gpu=false",
                  "checkpoint.max_failures=5", "scaling.node_start_timeout_s=400")
    _until(job, tmp_path, lambda log: job.poll() is not None, 400, "the job to end")
    output = _log(tmp_path)
    assert "Job entrypoint command failed with exit code 6" in output, output[-4000:]
    message = re.search(r"error: rank 0: this run asked for GPUs \(scaling\.use_gpu\) but torch "
                        r"sees none on node \w+ \(gpu\.a10g\.spot, g5\.2xlarge\) on host .+",
                        output)
    assert message, output[-4000:]
    assert "nvidia-smi says: nvidia-smi is not installed" in message.group(0)
    assert "Fix: " in message.group(0) and "scaling.cpu_stands_in_for_gpu" in message.group(0)
    assert "RESULT" not in output and "epoch 0 step" not in output
    assert output.count("Training failed due to worker errors") <= 1, "retried"

    # The same for a data set the driver could not check (a path on the worker nodes).
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    job = _submit(cluster, tmp_path, "nodata", "scaling.accelerator_type=A10G",
                  "scaling.num_workers=1", "data.dataset=imagefolder", f"data.root={empty}",
                  "checkpoint.max_failures=5", "scaling.node_start_timeout_s=400")
    _until(job, tmp_path, lambda log: job.poll() is not None, 400, "the job to end")
    output = _log(tmp_path)
    assert "Job entrypoint command failed with exit code 2" in output, output[-4000:]
    assert "is a path on the worker nodes: the workers check it" in output
    assert re.search(r"error: rank 0: '\S+/train' does not exist", output), output[-4000:]
    assert output.count("Training failed due to worker errors") <= 1, "retried"


def test_refused_spot_falls_back_in_seconds_and_the_price_table_budget_stops_the_run(
        cluster, tmp_path):
    # Typed like imagenet_90ep: its A100 node types, no price in the recipe. Red if the fallback
    # waited out spot_wait_s (900 s by default), the nodes cost $0 (no table), or the budget let
    # an epoch run that would cross it.
    # A budget a few epochs long, whatever the machine's speed: the run must stop at the epoch end
    # where the next epoch would cross it, with the budget not yet spent.
    budget, epochs = 1.0, 50
    job = _submit(cluster, tmp_path, "typed", "scaling.prefer_spot=true",
                  "scaling.start_check_s=5", f"train.epochs={epochs}", f"train.budget_usd={budget}",
                  "cost.log_every_s=2", f"tracking.uri=sqlite:///{tmp_path / 'typed.db'}")
    fell_back = _until(job, tmp_path, lambda log: "falling back to on-demand" in log, 240,
                       "the fallback")
    fell_back_after_s = time.monotonic() - job.launched
    _until(job, tmp_path, lambda log: job.poll() is not None, 900, "the job to end")
    output = _log(tmp_path)
    assert fell_back and "Job entrypoint command failed with exit code 5" in output, output[-4000:]
    refused = re.search(r"spot refused by the cloud: (\d+) launches of gpu\.a100x8\.spot failed "
                        r"\(An error occurred \(InsufficientInstanceCapacity\)", output)
    assert refused and int(refused.group(1)) >= 2, output[-4000:]
    assert fell_back_after_s < 120, f"fell back {fell_back_after_s:.0f} s after the launch"
    types = {cluster.node_type(pid) for pid in cluster.worker_raylets().values()}
    assert "gpu.a100x8.ondemand" in types and "gpu.a100x8.spot" not in types, types
    result = _result(output)
    assert result["stopped"] == "budget" and 1 <= result["epochs"] < epochs, result
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["rn50.market"] == "on-demand", run.data.tags
    assert run.data.tags["rn50.fallback_reason"].startswith("spot refused by the cloud")
    # Priced from the table: the head and the two on-demand A100 nodes, for at most the job's
    # wall time; at least the two nodes for the epochs they trained (each epoch > 1 s).
    wall_s = result["wall_s"]
    ceiling = (PRICE_PER_H["ray.head.default"] + 2 * PRICE_PER_H["gpu.a100x8.ondemand"]) * \
        wall_s / 3600
    assert 2 * PRICE_PER_H["gpu.a100x8.ondemand"] * result["epochs"] / 3600 < \
        result["cost_usd"] <= ceiling, (result["cost_usd"], ceiling)
    stop = re.search(r"budget: \$([\d.]+) spent, the next epoch \(~(\d+) s at \$([\d.]+)/h\) would "
                     r"pass train\.budget_usd=1;", output)
    assert stop, output[-4000:]
    # The spend at the stop as the run recorded it (the message rounds it to cents; an epoch
    # cost ~4 cents here). The guard reckons the next epoch as long as the last: it stops before
    # the budget is spent, or past it by what an epoch took over the last (seen: $1.0006 on the
    # $1 budget); a guard that waited for the budget to be spent would pass it by up
    # to a whole epoch, and one that stopped an epoch early would leave one unspent.
    spent = float(run.data.tags["rn50.cost_usd"])
    epoch_s, rate = float(stop.group(2)), float(stop.group(3))
    epoch_usd = rate * epoch_s / 3600
    assert abs(spent - float(stop.group(1))) <= 0.005, (spent, stop.group(0))
    assert spent < budget + epoch_usd / 4 and budget < spent + epoch_usd + 0.01, (spent, epoch_usd)
