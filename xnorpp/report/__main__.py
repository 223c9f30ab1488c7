"""``python -m xnorpp.report``: see :mod:`xnorpp.report.cli`."""

import sys

from .cli import main

sys.exit(main())
