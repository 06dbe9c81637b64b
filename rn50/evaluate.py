"""Evaluate a trained model: `rn50-evaluate --checkpoint URI [--ema] [--tta-flip]`.

The same command as `python -m rn50.evaluate` and `python ray_jobs/evaluate.py`. Top-1/top-5 on
the model's validation set and a misclassification gallery, logged to MLflow
(`rn50.serve.evaluate`). With `--workers N` (N > 1) the set is split into N shards evaluated as
Ray tasks (`rn50.distributed.evaluate_tasks`: a local Ray, or the cluster in RAY_ADDRESS, e.g.
under `ray job submit`); with 1 it runs here, without Ray.
"""
import json
import sys

from rn50.serve import evaluate
from rn50.serve.artifacts import USER_ERRORS


def main() -> int:
    """Parse the command line, evaluate, print `RESULT {...}`; 2 on a user error."""
    args = evaluate.build_parser().parse_args()
    try:
        if args.workers > 1:
            from rn50.distributed.evaluate_tasks import ray_map  # imports Ray: only when needed
            mapper = ray_map(args.cpus_per_worker, args.gpus_per_worker)
        else:
            mapper = evaluate.local_map
        summary = evaluate.run_from_args(args, mapper)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
