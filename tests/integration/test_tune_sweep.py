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
from tests.integration.jobs import REPO

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_server):
    """Run tune_spaces/smoke.yaml once for the module: (RESULT dict, output, tmp dir)."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "ray_jobs/tune_imagenette.py", "--space",
                           "tune_spaces/smoke.yaml", "--name", "smoke", "--storage", str(tmp / "runs"),
                           f"data.root={tmp / 'digits'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), output, tmp


def test_sweep_picks_a_best_trial_and_writes_a_usable_recipe(sweep):
    result, output, tmp = sweep
    # Two CPUs, one 1-CPU worker per trial: never more than two trials running at once.
    assert "at most 2 trial(s) at once" in output
    running = [int(n) for n in re.findall(r"Trial status:[^\n]*?(\d+) RUNNING", output)]
    assert running and max(running) <= 2
    assert result["metric"] == "val_top1" and 0 <= result["best_value"] <= 100
    assert set(result["best_config"]) == {"optim.lr", "optim.weight_decay"}
    assert sum(result["trials"].values()) == 4
    recipe = load_config(result["best_recipe"])  # what train_full.py --recipe PATH does
    assert recipe.optim.lr == pytest.approx(result["best_config"]["optim.lr"])
    assert recipe.scaling.num_workers == 1 and str(tmp / "digits") == recipe.data.root
    assert Path(result["checkpoint"], "manifest.json").is_file()


def test_mlflow_has_a_parent_with_one_child_per_trial(sweep, mlflow_server):
    result, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["sweep.search"] == "random"
    assert parent.data.metrics["best_val_top1"] == pytest.approx(result["best_value"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"lr_wd_plane.png", "learning_curves.png", "trials.json", "best_recipe.yaml"} <= artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    statuses = {c.data.tags["rn50.trial_status"] for c in children}
    assert statuses <= {"completed", "stopped_by_asha"} and "completed" in statuses
    for child in children:
        assert "optim.lr" in child.data.params
        history = client.get_metric_history(child.info.run_id, "val/top1")
        assert history and [m.step for m in history] == list(range(len(history)))
        if child.data.tags["rn50.trial_status"] == "stopped_by_asha":
            assert child.info.status == "KILLED" and len(history) < 3


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_mlflow_ui_lists_the_child_runs(sweep, mlflow_server, tmp_path):
    from playwright.sync_api import sync_playwright

    result, _, _ = sweep
    client = MlflowClient(mlflow_server.tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
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


def test_a_sweep_whose_driver_dies_resumes_with_the_same_name(tmp_path):
    command = [sys.executable, "ray_jobs/tune_imagenette.py", "--space", "tune_spaces/smoke.yaml",
               "--name", "resumed", "--storage", str(tmp_path / "runs"),
               f"data.root={tmp_path / 'digits'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list((tmp_path / "runs" / "resumed" / "trials").glob("*/checkpoint_2*/manifest.json")):
        assert first.poll() is None and time.time() < deadline, "no trial checkpoint before the kill"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep driver and the local Ray it started
    first.wait()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "resuming sweep 'resumed'" in output
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert sum(result["trials"].values()) == 4
