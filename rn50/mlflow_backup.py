"""`python -m rn50.mlflow_backup`: the documented short path to `rn50.io.mlflow_backup` (see
that module)."""
import sys

from rn50.io.mlflow_backup import main

if __name__ == "__main__":
    sys.exit(main())
