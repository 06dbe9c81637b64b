"""The smoke sweep end to end: Tune + Train trials, ASHA, MLflow parent/child, and the MLflow UI
showing them in a real headless Chromium."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rn50.config import load_config
from rn50.search_space import trial_run_name
from tests.browser import launch
from tests.integration.jobs import REPO


@pytest.fixture(scope="module")
def sweep(module_tmp, mlflow_server):
    """tune_spaces/smoke.yaml, its driver SIGKILLed (with the local Ray it started) once ASHA has
    stopped a trial, then run again to the end: (RESULT dict, output of the second run, tmp dir,
    trials finished before the kill -> their result.json text). Every test of the module checks
    the sweep as a user gets it after such a resume.

    Killed only after ASHA's decision: Tune saves the searcher's state but not the scheduler's
    (`TuneController` leaves `_scheduler_alg` out), so a resumed sweep's ASHA starts with empty
    rungs and cannot stop a trial by comparing it with trials from before the resume."""
    tmp = module_tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "ray_jobs/tune_imagenette.py", "--space", "tune_spaces/smoke.yaml",
               "--name", "smoke", "--storage", str(tmp / "runs"), f"data.root={tmp / 'digits'}",
               "tracking.system_metrics_interval_s=0"]  # ~3 s of each trial's start
    with open(tmp / "first.log", "w") as log:  # where trials ran side by side, before the kill
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while not (_finished_trials(tmp / "runs" / "smoke") and _stopped_early(tmp / "runs" / "smoke")):
        assert first.poll() is None and time.time() < deadline, "no trial stopped before the kill"
        time.sleep(1)
    time.sleep(3)  # let Tune write its experiment state after the trial ended
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = _finished_trials(tmp / "runs" / "smoke")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), output, tmp, done_before


def test_sweep_picks_a_best_trial_and_writes_a_usable_recipe(sweep):
    result, output, tmp, _ = sweep
    # Two CPUs, one 1-CPU worker per trial: two trials side by side, never more. Counted in
    # each run's console (the first one's trials never end there: it was killed).
    assert "at most 2 trial(s) at once" in output
    first = (tmp / "first.log").read_text(errors="replace")
    assert _most_trials_at_once(first) == 2 and _most_trials_at_once(output) <= 2
    assert result["metric"] == "val_top1" and 0 <= result["best_value"] <= 100
    assert set(result["best_config"]) == {"optim.lr", "optim.weight_decay"}
    assert sum(result["trials"].values()) == 4
    recipe = load_config(result["best_recipe"])  # what train_full.py --recipe PATH does
    assert recipe.optim.lr == pytest.approx(result["best_config"]["optim.lr"])
    assert recipe.scaling.num_workers == 1 and str(tmp / "digits") == recipe.data.root
    assert Path(result["checkpoint"], "manifest.json").is_file()


def _children(client, parent_run_id: str):
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_the_best_config_is_the_child_run_with_the_best_metric(sweep, mlflow_server):
    result, _, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    best_of = {child.info.run_id: max(m.value for m in client.get_metric_history(
        child.info.run_id, "val/top1")) for child in _children(client, result["mlflow_run_id"])}
    winner = client.get_run(max(best_of, key=best_of.get))
    assert best_of[winner.info.run_id] == pytest.approx(result["best_value"])
    for key, value in result["best_config"].items():
        assert float(winner.data.params[key]) == pytest.approx(value), key


def test_mlflow_has_a_parent_with_one_child_per_trial(sweep, mlflow_server):
    result, _, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["sweep.search"] == "random"
    assert parent.data.metrics["best_val_top1"] == pytest.approx(result["best_value"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    expected = {"lr_wd_plane.png", "learning_curves.png", "trials.json", "best_recipe.yaml"}
    assert expected <= artifacts, artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    statuses = {c.data.tags["rn50.trial_status"] for c in children}
    assert statuses == {"completed", "stopped_by_asha"}, statuses
    # The diverging learning rate (8.0) is what ASHA must have stopped at its first rung.
    diverged = next(c for c in children if float(c.data.params["optim.lr"]) == 8.0)
    assert diverged.data.tags["rn50.trial_status"] == "stopped_by_asha"
    for child in children:
        assert "optim.lr" in child.data.params
        # Named by its values, so the compare view's legend says which curve is which trial.
        assert child.info.run_name == trial_run_name(
            {key: float(child.data.params[key]) for key in ("optim.lr", "optim.weight_decay")})
        history = client.get_metric_history(child.info.run_id, "val/top1")
        assert history and [m.step for m in history] == list(range(len(history)))
        if child.data.tags["rn50.trial_status"] == "stopped_by_asha":
            assert child.info.status == "KILLED" and len(history) < 3


def test_the_lr_wd_plane_plots_exactly_the_child_runs(sweep, mlflow_server, tmp_path):
    from PIL import Image

    from rn50.distributed.sweep_report import PLOTTED_POINTS_KEY
    result, _, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    plane = client.download_artifacts(result["mlflow_run_id"], "lr_wd_plane.png", str(tmp_path))
    drawn = sorted(map(tuple, json.loads(Image.open(plane).text[PLOTTED_POINTS_KEY])))
    expected = sorted((float(c.data.params["optim.lr"]), float(c.data.params["optim.weight_decay"]))
                      for c in _children(client, result["mlflow_run_id"]))
    assert len(drawn) == len(expected) == 4
    for point, child in zip(drawn, expected):  # pair by pair: approx takes no nested sequences
        assert point == pytest.approx(child), (drawn, expected)


def test_mlflow_ui_lists_the_child_runs(sweep, mlflow_server, tmp_path):
    from playwright.sync_api import sync_playwright

    result, _, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{mlflow_server.tracking_uri}/#/experiments/{parent.info.experiment_id}/runs")
        page.get_by_text("smoke", exact=True).first.wait_for(timeout=60_000)
        # Child runs sit collapsed under their parent: the (+) button in its name cell expands it.
        parent_row = page.locator("[role=row]", has_text="smoke").first
        parent_row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        for child in children:
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "runs.png"))
        page.goto(f"{mlflow_server.tracking_uri}/#/experiments/{parent.info.experiment_id}"
                  f"/runs/{children[0].info.run_id}")
        page.get_by_text("val/top1").first.wait_for(timeout=30_000)
        page.get_by_text(children[0].info.run_name).first.wait_for(timeout=30_000)
        browser.close()


def _most_trials_at_once(console: str) -> int:
    """The most trials running at once, from Tune's lines as each trial starts and ends, in the
    order printed (its `Trial status` lines come only every 30 s: a sweep that fast may print
    none while trials run)."""
    running, most = set(), 0
    for trial, event in re.findall(r"Trial (\S+) (started with|completed after|errored after)",
                                   console):
        (running.add if event == "started with" else running.discard)(trial)
        most = max(most, len(running))
    return most


def _finished_trials(sweep_dir: Path, epochs: int = 3) -> dict[str, str]:
    """Trial folder -> its result.json text, for trials Tune logged every epoch of."""
    finished = {}
    for results in sweep_dir.glob("*/result.json"):
        text = results.read_text()
        if len([line for line in text.splitlines() if line.strip()]) >= epochs:
            finished[results.parent.name] = text
    return finished


def _stopped_early(sweep_dir: Path, epochs: int = 3) -> bool:
    """Whether a trial's last logged result has Tune's `done` flag before its last epoch."""
    for results in sweep_dir.glob("*/result.json"):
        lines = results.read_text().splitlines()
        try:
            last = json.loads(lines[-1]) if lines else {}
        except ValueError:  # being written right now
            continue
        if last.get("done") and last["training_iteration"] < epochs:
            return True
    return False


def test_a_sweep_whose_driver_died_resumed_without_rerunning_finished_trials(sweep):
    result, output, tmp, done_before = sweep
    assert "resuming sweep 'smoke'" in output
    assert sum(result["trials"].values()) == 4
    after = _finished_trials(tmp / "runs" / "smoke")
    for trial, text in done_before.items():  # finished trials were not trained again
        assert after[trial] == text, f"{trial} was rerun after the resume"


def test_mlflow_compares_two_trials_curves_and_params(sweep, mlflow_server, tmp_path):
    """The way users compare runs: MLflow's compare view of two trials (their differing params),
    then its val/top1 chart with both curves. RN50_RECORD_RESULTS=1 keeps the screenshots in
    docs/img/ for docs/sweeps.md."""
    from playwright.sync_api import sync_playwright

    result, _, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    completed = [run for run in _children(client, result["mlflow_run_id"])
                 if run.data.tags["rn50.trial_status"] == "completed"]
    first, second = sorted(completed, key=lambda run: float(run.data.params["optim.lr"]))[:2]
    ids = json.dumps([first.info.run_id, second.info.run_id])
    out = REPO / "docs" / "img" if os.environ.get("RN50_RECORD_RESULTS") == "1" else tmp_path
    out.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        experiments = json.dumps([first.info.experiment_id])
        page.goto(f"{mlflow_server.tracking_uri}/#/compare-runs?runs={ids}"
                  f"&experiments={experiments}")
        page.get_by_text("Comparing 2 Runs").first.wait_for(timeout=60_000)
        lr_row = page.locator("tr").filter(has=page.get_by_text("optim.lr", exact=True)).first
        lr_row.wait_for(timeout=30_000)
        assert lr_row.inner_text().split("\t")[1:] == [first.data.params["optim.lr"],
                                                      second.data.params["optim.lr"]]
        lr_row.scroll_into_view_if_needed()
        page.screenshot(path=str(out / "mlflow-compare-params.png"))
        # The page a metric's name links to from the compare view: both runs on one chart.
        page.goto(f"{mlflow_server.tracking_uri}/#/metric?runs={ids}&metric=\"val/top1\""
                  f"&experiments={experiments}&plot_metric_keys=[\"val/top1\"]&x_axis=step")
        for run in (first, second):  # both curves: one legend entry per run
            page.get_by_text(f"{run.info.run_name} (val/top1)").first.wait_for(timeout=60_000)
        rows = page.locator("tr", has_text="(step=2)")
        assert rows.count() == 2  # both curves reach the last epoch
        page.screenshot(path=str(out / "mlflow-compare-val-top1.png"))
        browser.close()
