"""Train ResNet-50 with Ray Train: `python ray_jobs/train_full.py --recipe demo optim.lr=0.1`.

The entrypoint `ray job submit --working-dir . -- python ray_jobs/train_full.py` runs; the command
itself (options, exit codes) is `rn50.train`, installed as `rn50-train`. Under `ray job submit`
Ray puts the shipped working directory first on the job's PYTHONPATH, so `rn50` comes from it;
run by hand, from the install (`pip install -e .`).
"""
import sys

from rn50.train import main

if __name__ == "__main__":
    sys.exit(main())
