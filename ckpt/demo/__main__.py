"""``python -m ckpt.demo``: see the package docstring."""

import sys

from ckpt.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
