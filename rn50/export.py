"""`python -m rn50.export`: the documented short path to `rn50.serve.export` (see that module)."""
import sys

from rn50.serve.export import main

if __name__ == "__main__":
    sys.exit(main())
