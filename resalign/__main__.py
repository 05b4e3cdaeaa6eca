"""``python -m resalign``: the command line (what ``torchrun -m resalign`` runs on every rank)."""

import sys

from resalign.cli import main

sys.exit(main())
