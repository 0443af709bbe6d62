"""`python -m flexcomp` and the `flexcomp` console script: see flexcomp/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
