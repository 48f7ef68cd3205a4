"""``python -m afkern.train`` (and ``torchrun -m afkern.train``): the ``afkern-train`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
