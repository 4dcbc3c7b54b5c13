"""``python -m mars.status``: the same as the ``mars-status`` command."""

import sys

from .cli import main

sys.exit(main())
