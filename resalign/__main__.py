"""``python -m resalign``: the ``resalign`` command."""

import sys

from resalign.cli import main

sys.exit(main())
