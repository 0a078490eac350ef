"""``python -m asyncframes`` is the ``asyncframes`` command."""

import sys

from .cli import main

sys.exit(main())
