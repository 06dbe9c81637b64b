"""Sweep LR and weight decay with Ray Tune: `rn50-tune --space FILE`.

The same command as `python -m rn50.tune` and `python ray_jobs/tune_imagenette.py`.

Each trial is a full Ray Train run; the sweep is one MLflow parent run with a child per trial.
Re-running with the same --name and --storage resumes an interrupted sweep.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from rn50.config import ConfigError
from rn50.search_space import load_sweep
from rn50.io.storage import STORAGE_ENV, StorageError, default_storage


def main() -> int:
    """Parse the command line, run the sweep, print `RESULT {...}`; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="tune_spaces/imagenette_lr_wd.yaml", help="sweep YAML")
    parser.add_argument("--name", help="sweep name; the same name + storage resumes the sweep")
    parser.add_argument("--storage", default=default_storage(),
                        help=f"local folder or s3://bucket/prefix (default: ${STORAGE_ENV}, "
                        "else ./runs)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every trial")
    args = parser.parse_args()
    try:
        spec = load_sweep(args.space)
        spec.base_config(args.overrides)
    except ConfigError as err:  # before Ray starts
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.name or f"sweep-{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from rn50.distributed.capacity import ResourcesUnavailableError
    from rn50.distributed.tune import run_sweep  # imports Ray; only needed once the space is valid
    try:
        summary = run_sweep(spec, name, args.storage, args.overrides)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ResourcesUnavailableError as err:  # the cluster could not give the workers their nodes
        print(f"error: {err}", file=sys.stderr)
        return 4
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
