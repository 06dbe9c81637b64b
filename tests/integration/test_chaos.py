"""The chaos run, short: the reference's elastic run (1 to 2 workers, tests/integration/jobs.py)
on a head and two 1-CPU nodes while a seeded controller (tests/integration/chaos.py) hits it with
3 faults of 3 kinds at moments it draws: a node lost and one added back, the newest checkpoint
torn in storage before a worker crash, the driver killed and the job submitted again. To fit the
suite, the run starts from a copy of the straight run's checkpoint at the end of epoch 1 of 5
(test_faults.py resumes copies the same way): 64 steps to go under fire, room for the three
faults and their recoveries on a fast machine (from the end of epoch 3, a run at 0.4 s a step
ended before the third fault could land).

Red if any step is never trained, a resume starts from a checkpoint that did not verify (or
skips ahead), an epoch is logged twice, the resubmitted driver starts a second MLflow run, a
fault hangs the run, or the final weights differ from the fixed-size straight run's
(`reference`): 2 micro-batches per step on 1 worker or 2 are the same arithmetic, so every fault
must cost time only. benchmarks/chaos.py is the long version. (It took over test_faults.py's
killed-driver-and-torn-checkpoint run, which asserted the same.)
"""
import pytest
from mlflow import MlflowClient

from tests.integration.chaos import Chaos, draw_plan
from tests.integration.chaos_account import account
from tests.integration.fake_cluster import FakeCluster
from tests.integration.faults import fingerprint
from tests.integration.jobs import REFERENCE_EPOCHS, epochs_logged, reference_epoch_end

pytestmark = pytest.mark.integration

SEED = 22
START_EPOCH = 1  # the run starts from the straight run's checkpoint at the end of epoch 0 (0-based)
KINDS = ("node_lost", "torn_checkpoint", "driver_kill")
# What the run must do about each kind, as its log says (chaos.RESPONSES).
EXPECTED = {"node_lost": "restart", "torn_checkpoint": "skipped torn checkpoint",
            "driver_kill": "restart"}


@pytest.fixture
def cluster():
    """A head without CPUs and two 1-CPU nodes (test_elastic_cluster.py's cluster)."""
    with FakeCluster(autoscaling=False) as started:
        started.add_node()
        started.add_node()
        yield started


def test_three_faults_of_three_kinds_cost_no_step_and_no_bit(reference, cluster, tmp_path):
    digits, done, straight = reference
    chaos = Chaos(cluster, tmp_path, digits, REFERENCE_EPOCHS, SEED,
                  draw_plan(SEED, KINDS, len(KINDS)), gap_s=(1.0, 4.0), regain_timeout_s=240,
                  start_from=reference_epoch_end(done, START_EPOCH - 1))
    result = chaos.run()
    report = account(chaos, result)
    output = chaos.log()
    assert result is not None, output[-4000:]
    assert sorted(f.kind for f in chaos.faults) == sorted(KINDS), report["faults"]
    for fault in report["faults"]:
        assert fault["time_lost_s"] is not None, fault  # no hang
        assert fault["responses"].get(EXPECTED[fault["kind"]]), fault
    assert report["steps_lost"] == 0, report
    assert report["resumes"] and all(r["checkpoint_verified"] for r in report["resumes"]), \
        (report["resumes"], chaos.verified)
    assert epochs_logged(result) == list(range(START_EPOCH, REFERENCE_EPOCHS))
    # The resubmitted driver found its run's MLflow run again (a second run would hold the
    # epochs after the kill, and MLflow's history would be split in two).
    assert "(resumed) at" in output, output[-4000:]
    client = MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("rn50-demo")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == \
        [result["mlflow_run_id"]]
    assert fingerprint(result["checkpoint"]) == straight, "not the fixed-size run's weights"
    print("chaos:", {k: v for k, v in report.items() if k != "faults"})
