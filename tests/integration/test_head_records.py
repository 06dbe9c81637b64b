"""The head's records outlive its container and its disk, as cluster.yaml keeps them: MLflow's
sqlite database in a host folder (docker.head_run_options), backed up to S3 after every job, and
each checkpoint recording what the run had cost. And the budget, both ways it stops a run.

On the rehearsal's real servers (SeaweedFS S3, `mlflow server` on sqlite), a demo run priced at a
made-up $3,600/h (a dollar for every second its local Ray node is up): a $1 budget that its first
epoch spends stops it after that epoch; MLflow's server is stopped and started again on the same
folder (a new container); the folder is lost and restored from S3 (a new head); then restored from
a backup older than the run (the 15-minute loop's last copy), where only the checkpoint knows the
spend: a budget below it is refused, and a resume counts on from it with a budget that is not yet
spent at an epoch's end but that the next epoch would cross: it stops there. Three short jobs
(~3 minutes on 2 cores)."""
import re
import shutil

import pytest
from mlflow import MlflowClient

from rn50.data.small_datasets import prepare_digits
from rn50.io import checkpoints as ckpt
from rn50.io import mlflow_backup
from tools.local_servers import MlflowServer
from tests.integration.jobs import run_job, small

pytestmark = pytest.mark.integration
NAME, EXPERIMENT, EPOCHS = "budget", "rn50-demo", 4
# What rank 0 prints when it stops a run on the budget: (spent US$, the next epoch's seconds).
BUDGET_STOP = r"budget: \$([\d.]+) spent, the next epoch \(~(\d+) s at"


def _args(tmp_path, budget_usd: float) -> list[str]:
    # $3,600 an hour: a dollar for every second the job's local Ray node is up.
    return ["--recipe", "demo", "--name", NAME, "--storage", str(tmp_path / "runs"),
            *small(tmp_path, epochs=EPOCHS), "data.max_train_samples=384",
            "data.max_val_samples=64",
            "cost.local_usd_per_hour=3600", "cost.log_every_s=2", f"train.budget_usd={budget_usd}"]


def _costs(server: MlflowServer) -> list[tuple[int, float]]:
    """The run's (step, cost/usd) history as the server has it, [] if it has no such run."""
    client = MlflowClient(server.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert len(runs) <= 1, runs
    history = client.get_metric_history(runs[0].info.run_id, "cost/usd") if runs else []
    return sorted((m.step, m.value) for m in history)


def _records(server: MlflowServer) -> tuple | None:
    """(status, val/top1 steps, last cost/usd, stop tag) of the run, as the server has it."""
    client = MlflowClient(server.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if not runs:
        return None
    run = runs[0]
    epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    return (run.info.status, epochs, _costs(server)[-1][1], run.data.tags.get("rn50.stopped_by"))


def _lose_folder_and_restore(server: MlflowServer, backup: str) -> None:
    server.stop()
    shutil.rmtree(server.directory)
    assert mlflow_backup.restore(server.directory / "mlflow.db", backup) is True
    server.start()


def _check_first_stop(output: str, first: dict, server: MlflowServer) -> None:
    """Job 1 ($1, spent within its first epoch): red if the budget is not checked at epoch ends,
    the stop loses its checkpoint, or the cost is not the wall time x the price."""
    assert "stopping after epoch 0 with a checkpoint" in output
    assert "rerun with a higher train.budget_usd" in output
    assert ckpt.verify(first["checkpoint"], hashes=False)["summary"]["epoch"] == 0
    # The node is up for less than the job (Python, checks and ray.init come first): at most a
    # dollar a second of the job, and at least for all of it but its first half-minute.
    assert first["wall_s"] - 30 <= first["cost_usd"] <= first["wall_s"], first
    costs = [usd for _, usd in _costs(server)]
    assert len(costs) >= 3 and costs == sorted(costs), costs  # every cost.log_every_s, and last
    run = MlflowClient(server.tracking_uri).get_run(first["mlflow_run_id"])
    assert float(run.data.tags["rn50.budget_usd"]) == 1


def test_the_run_its_metrics_and_its_spend_survive_the_head(tmp_path, s3_env):
    folder, bucket = tmp_path / "host-mlflow", f"s3://{s3_env.bucket}/head-records"
    db, backup, stale = folder / "mlflow.db", f"{bucket}/mlflow.db", f"{bucket}/stale.db"
    mlflow_backup.restore(db, backup)  # as the head's first start command: nothing to restore
    server = MlflowServer(folder, s3_env)
    server.start()
    # The digits written before job 1, not by its workers: job 3's start-up must cost what job
    # 1's did (its budget is reckoned from it, one epoch of margin either way).
    prepare_digits(tmp_path / "digits")
    env = {**s3_env.env(), "MLFLOW_TRACKING_URI": server.tracking_uri,
           "RN50_MLFLOW_BACKUP_STATUS": str(mlflow_backup.status_path(db))}
    try:
        mlflow_backup.backup(db, stale)  # the backup loop's last copy before the run
        code, output, first = run_job(_args(tmp_path, 1), env)
        assert code == 5 and first["stopped"] == "budget" and first["epochs"] == 1, output[-4000:]
        _check_first_stop(output, first, server)
        expected = ("KILLED", [0], pytest.approx(first["cost_usd"], abs=1e-3), "budget")
        spent_at_stop, epoch_s = (float(x) for x in re.findall(BUDGET_STOP, output)[0])
        startup_usd = spent_at_stop - epoch_s  # what the job cost before its first epoch began

        # A new container on the same host folder: everything is there.
        server.stop()
        server.start()
        assert _records(server) == expected
        # A new head: the folder is gone, the job-end backup on S3 brings it all back.
        _lose_folder_and_restore(server, backup)
        assert _records(server) == expected

        # A new head whose last backup predates the run: MLflow knows nothing of it, the
        # checkpoint (in storage) still knows what it cost.
        _lose_folder_and_restore(server, stale)
        assert _records(server) is None
        spent_usd, spent_s = ckpt.spent_of_run(str(tmp_path / "runs" / NAME))
        assert 1 < spent_usd <= first["cost_usd"]  # taken just before the job's last cost log
        code, output, refused = run_job(_args(tmp_path, round(spent_usd - 0.5, 2)), env,
                                        timeout=180)
        assert code == 2 and refused is None, output[-4000:]
        assert "(recorded in its newest checkpoint)" in output
        assert "Started a local Ray instance" not in output  # refused before Ray starts
        _resume_stops_before_crossing(tmp_path, env, server, spent_usd, spent_s,
                                      budget=round(spent_usd + startup_usd + 2 * epoch_s, 2))
    finally:
        server.stop()


def _resume_stops_before_crossing(tmp_path, env, server, spent_usd, spent_s, budget) -> None:
    """Job 3: resumed with a budget that its first epoch does not spend (one epoch of margin)
    and that its last would cross (one epoch of margin): it stops at an epoch end before the last,
    with the budget not yet spent there. Red if the resume counted from MLflow's $0 (its first
    cost/usd would be this job's few dollars and it would run to the end), if the guard waited
    for the budget to be spent, or if the stop lost the run's epochs."""
    code, output, last = run_job(_args(tmp_path, budget), env)
    assert code == 5 and last["stopped"] == "budget" and last["epochs"] in (2, 3), output[-4000:]
    assert "resumed from" in output and f"had cost ${spent_usd:.2f} by its newest" in output
    spent_at_stop, _ = (float(x) for x in re.findall(BUDGET_STOP, output)[0])
    assert spent_at_stop < budget, (spent_at_stop, budget)
    costs = _costs(server)
    assert costs[0][0] >= spent_s and costs[0][1] >= spent_usd, (costs[0], spent_usd)
    # Carried over: the checkpoint's spend plus this job's node time, at a dollar a second.
    assert spent_usd + last["wall_s"] - 30 <= last["cost_usd"] <= spent_usd + last["wall_s"], last
    status, epochs, cost_usd, stopped_by = _records(server)
    assert (status, epochs, stopped_by) == ("KILLED", list(range(1, last["epochs"])), "budget")
    assert cost_usd == pytest.approx(last["cost_usd"], abs=1e-3)
