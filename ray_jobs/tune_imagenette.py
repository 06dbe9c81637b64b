"""Sweep LR and weight decay with Ray Tune: `python ray_jobs/tune_imagenette.py --space FILE`.

The job entrypoint; the command itself is `rn50.tune`, installed as `rn50-tune` (`rn50` comes
from the working directory `ray job submit` ships, or from `pip install -e .`).
"""
import sys

from rn50.tune import main

if __name__ == "__main__":
    sys.exit(main())
