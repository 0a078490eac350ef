"""``python -m asyncframes`` is the ``asyncframes`` command."""

import sys

from ._cli import main

sys.exit(main())
