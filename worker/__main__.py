"""``python -m worker``: the same as ``rabo worker``."""

import sys

from worker.cli import main

sys.exit(main())
