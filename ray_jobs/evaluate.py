"""Evaluate a trained model: `python ray_jobs/evaluate.py --checkpoint URI [--ema] [--tta-flip]`.

The job entrypoint; the command itself is `rn50.evaluate`, installed as `rn50-evaluate` (`rn50`
comes from the working directory `ray job submit` ships, or from `pip install -e .`).
"""
import sys

from rn50.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
