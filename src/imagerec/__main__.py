"""`python -m imagerec` (and `torchrun -m imagerec`): the command line."""

import sys

from imagerec.cli import main

if __name__ == "__main__":
    sys.exit(main())
