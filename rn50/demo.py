"""`python -m rn50.demo`: the documented short path to `rn50.serve.demo` (see that module)."""
import sys

from rn50.serve.demo import main

if __name__ == "__main__":
    sys.exit(main())
