"""``python -m ckpt.cli``: the ``ckpt`` command without the console script."""

import sys

from . import main

sys.exit(main())
