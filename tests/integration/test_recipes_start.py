"""Every recipe in rn50/recipes starts training on a workstation's local Ray (no market labels, no
autoscaler, no GPU) within a minute of its driver's checks: shrunk for the CPU (tiny images and
batches, one worker, `scaling.use_gpu=false`, a 4-class parquet ImageNet or the digits), its
scaling, spot, schedule and regularizer settings left as they are. Red for a recipe that waits
for nodes that never come (the GPU recipes' `prefer_spot` once asked a workstation for
spot-labelled nodes for 15 minutes) or fails to build. Each driver is killed once its first step
is logged; one `ray start --head` serves them all, as on a workstation.

Recipes that start the same way are started once: what decides a start on Ray (every scaling,
cost and checkpoint setting, the data set's kind, torch.compile, the budget; `start_path`) is
shared by the seven A100 ImageNet recipes, which differ only in the model, schedule and
regularizers, and tests/unit/test_recipes.py takes a training step with each recipe's own. The
demo's start is not repeated here: test_train_job.py trains it whole on a local Ray, as the
README's first command does (DONE_ELSEWHERE)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rn50.config import RECIPES_DIR, load_config
from rn50.data.small_datasets import prepare_digits
from tests.ilsvrc_fixture import make_hf_parquet, make_ilsvrc
from tests.integration.fake_cluster import FakeCluster, kill_tree
from tests.integration.jobs import LEAN_TRACKING, REPO

pytestmark = pytest.mark.integration
FIRST_STEP_S = 60
SHRUNK_SCALING = ["scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
                  "scaling.accelerator_type="]


def start_path(recipe: str) -> str:
    """What decides how `recipe` starts on a local Ray once shrunk for the CPU."""
    config = load_config(recipe, SHRUNK_SCALING)
    return json.dumps({"scaling": dataclasses.asdict(config.scaling),
                       "cost": dataclasses.asdict(config.cost),
                       "checkpoint": dataclasses.asdict(config.checkpoint),
                       "dataset": config.data.dataset, "compile": config.train.compile,
                       "budget_usd": config.train.budget_usd}, sort_keys=True, default=str)


def _one_per_start_path() -> dict[str, list[str]]:
    """A recipe of each start path -> every recipe that starts the same way."""
    groups: dict[str, list[str]] = {}
    for recipe in sorted(path.stem for path in RECIPES_DIR.glob("*.yaml")):
        groups.setdefault(start_path(recipe), []).append(recipe)
    return {recipes[0]: recipes for recipes in groups.values()}


DONE_ELSEWHERE = {"demo"}  # test_train_job.py::test_demo_recipe_learns_on_s3_and_lands_in_mlflow
STARTED = {recipe: same for recipe, same in _one_per_start_path().items()
           if not DONE_ELSEWHERE & set(same)}


@pytest.fixture(scope="module")
def workstation(module_tmp):
    """A one-node Ray with 2 CPUs, started with `ray start --head` (no labels, no autoscaler)."""
    cluster = FakeCluster(autoscaling=False)
    cluster.start()
    cluster.add_node(num_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(module_tmp):
    """{dataset kind: overrides}: a 4-class ImageNet as HF parquet, and the digits."""
    tree = module_tmp / "ilsvrc"
    labels = make_ilsvrc(tree, per_class=4, val_per_class=2)
    make_hf_parquet(tree, labels, module_tmp / "parquet")
    digits = prepare_digits(module_tmp / "digits")  # {train,val}/<digit>/*.jpg
    return {"parquet": [f"data.root={module_tmp / 'parquet'}", "data.num_classes=4"],
            "digits": [f"data.root={digits}"],
            "imagefolder": [f"data.root={digits}", "data.num_classes=10"]}


def _shrunk(recipe: str, data: dict, tmp_path) -> list[str]:
    dataset = load_config(recipe).data.dataset
    source = data[dataset] if dataset in data else \
        ["data.dataset=imagefolder", *data["imagefolder"]]  # imagenette would download
    return [*source, "train.epochs=1", "data.max_train_samples=16", "data.max_val_samples=8",
            "train.global_batch_size=8", "train.micro_batch_size=0", *SHRUNK_SCALING,
            "data.train_crop_px=32", "data.val_resize_px=32", "data.val_crop_px=32",
            "data.progressive_min_px=0", "data.loader_workers=0", "train.torch_threads=1",
            "train.log_every_steps=1", *LEAN_TRACKING,
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.parametrize("recipe", sorted(STARTED))
def test_every_recipe_starts_training_on_a_local_ray_within_a_minute(recipe, workstation, data,
                                                                     tmp_path):
    print(f"{recipe} starts as {', '.join(STARTED[recipe])} do")
    log_path = tmp_path / "job.log"
    env = {**workstation.env, "RAY_ADDRESS": workstation.gcs_address, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, "ray_jobs/train_full.py", "--recipe", recipe,
                                "--name", recipe, "--storage", str(tmp_path / "runs"),
                                *_shrunk(recipe, data, tmp_path)], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    launched, run_open_s, first_step_s = time.monotonic(), None, None
    try:
        while time.monotonic() - launched < FIRST_STEP_S + 180 and job.poll() is None:
            text = log_path.read_text(errors="replace")
            if run_open_s is None and f"[rn50] run '{recipe}' in " in text:
                run_open_s = time.monotonic() - launched  # checks done: the start begins
            if "epoch 0 step 0 " in text:
                first_step_s = time.monotonic() - launched
                break
            time.sleep(0.5)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            kill_tree(job.pid)
        job.wait(timeout=60)
    output = log_path.read_text(errors="replace")
    assert first_step_s is not None and run_open_s is not None, \
        f"{recipe} never trained:\n{output[-4000:]}"
    print(f"{recipe}: first step {first_step_s:.0f} s after the launch, "
          f"{first_step_s - run_open_s:.0f} s after its checks (Python, MLflow) were done")
    # From the start of the workers' start (Python's and MLflow's own start-up, which no
    # recipe changes, left out: seen 15-20 s on a busy 2-core machine).
    assert first_step_s - run_open_s < FIRST_STEP_S, output[-4000:]
    if load_config(recipe).scaling.prefer_spot:
        assert "scaling.prefer_spot ignored: no node of this cluster carries a rn50/market " \
               "label" in output, output[-4000:]
