"""`python -m rn50.checkpoint`: the documented short path to `rn50.core.checkpoint` (see that module)."""
import sys

from rn50.core.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
