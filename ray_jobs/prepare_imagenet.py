"""ImageNet -> shuffled parquet shards: `python ray_jobs/prepare_imagenet.py --source S --out O`.

The job entrypoint; the command itself is `rn50.prepare_imagenet`, installed as
`rn50-prepare-imagenet` (`rn50` comes from the working directory `ray job submit` ships, or from
`pip install -e .`).
"""
import sys

from rn50.prepare_imagenet import main

if __name__ == "__main__":
    sys.exit(main())
