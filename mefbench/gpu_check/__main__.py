"""``python3 -m mefbench.gpu_check``: see :mod:`mefbench.gpu_check`."""

import sys

from .runner import main

sys.exit(main())
