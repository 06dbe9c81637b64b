"""Train ResNet-50 with Ray Train: `rn50-train --recipe demo optim.lr=0.1`.

The same command as `python -m rn50.train` and `python ray_jobs/train_full.py` (the entrypoint
`ray job submit` runs). Works the same on a laptop (starts a local Ray) and under
`ray job submit` (joins the cluster).
Without --recipe/--storage it runs what the Ray head names ($RN50_RECIPE, $RN50_STORAGE, set by
cluster.yaml), else `demo` into ./runs; its first lines say which and why (rn50/io/job_defaults.py).
Re-running with the same --name and --storage resumes that run and its MLflow run.
Exit codes: 2 bad config, data or budget, 3 storage, 4 no resources, 5 stopped by
train.budget_usd, 6 a GPU run on a node whose GPU torch cannot use.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from rn50.config import ConfigError, load_config
from rn50.errors import PermanentError
from rn50.io import job_defaults
from rn50.io.storage import StorageError
from rn50.records import StopReason


def main() -> int:
    """Parse the command line, train, print `RESULT {...}`; the exit code (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="recipe name (rn50/recipes) or YAML path (default: "
                        f"${job_defaults.RECIPE_ENV}, else {job_defaults.LOCAL_RECIPE})")
    parser.add_argument("--name", help="run name; the same name + storage resumes the run")
    parser.add_argument("--storage", help="local folder or s3://bucket/prefix (default: "
                        f"${job_defaults.STORAGE_ENV}, else {job_defaults.LOCAL_STORAGE})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2")
    args = parser.parse_args()
    recipe, storage = job_defaults.recipe(args.recipe), job_defaults.storage(args.storage)
    print(recipe.line("recipe"), flush=True)
    try:
        config = load_config(recipe.value, args.overrides)
    except ConfigError as err:  # before Ray starts: a typo costs a second, not a cluster spin-up
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(storage.line("storage") + "\n" + job_defaults.tracking(
        config.tracking.uri, args.overrides).line("tracking"), flush=True)
    name = args.name or f"{Path(recipe.value).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from rn50.distributed.capacity import ResourcesUnavailableError
    from rn50.distributed.driver import run_training  # imports Ray: only for a valid config
    try:
        summary = run_training(config, name, storage.value)
    except (ConfigError, StorageError, ResourcesUnavailableError, PermanentError) as err:
        print(f"error: {err}", file=sys.stderr)  # each says what to fix; its class, the exit code
        return err.exit_code
    print("RESULT " + json.dumps(summary.to_dict()), flush=True)
    if summary.stopped is StopReason.BUDGET:  # checkpointed, not finished: the same command resumes
        print(f"[rn50] stopped by train.budget_usd={summary.budget_usd:g} after "
              f"{summary.last.epoch + 1} epochs (${summary.cost_usd:.2f} spent); rerun with a "
              "higher train.budget_usd to continue", file=sys.stderr, flush=True)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
