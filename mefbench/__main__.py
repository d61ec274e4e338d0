"""`python -m mefbench` (and `torchrun ... -m mefbench train ...`)."""

import sys

from .cli import main

sys.exit(main())
