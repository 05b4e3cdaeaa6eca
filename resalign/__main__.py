"""``python -m resalign``: the command line (also what ``torchrun -m resalign ...`` runs on every rank)."""

import sys

from resalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
