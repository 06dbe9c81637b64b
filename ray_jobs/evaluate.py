"""Evaluate a trained model: `python ray_jobs/evaluate.py --checkpoint URI [--ema] [--tta-flip]`.

Top-1/top-5 on the model's validation set and a misclassification gallery, logged to MLflow.
With `--workers N` (N > 1) the set is split into N shards evaluated as Ray tasks (a local Ray,
or the cluster in RAY_ADDRESS, e.g. under `ray job submit`); with 1 it runs here, without Ray.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from rn50.serve import evaluate
from rn50.serve.artifacts import USER_ERRORS


def ray_map(cpus: float, gpus: float):
    """A shard mapper that runs each shard as a Ray task."""
    import ray

    from rn50.distributed.ray_setup import init_ray
    init_ray()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(evaluate.evaluate_shard_job)
    return lambda spec, shards: ray.get([task.remote(spec, i, n) for i, n in shards])


def main() -> int:
    args = evaluate.build_parser().parse_args()
    try:
        mapper = ray_map(args.cpus_per_worker, args.gpus_per_worker) if args.workers > 1 \
            else evaluate.local_map
        summary = evaluate.run_from_args(args, mapper)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
