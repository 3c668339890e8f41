"""``python -m saekit ...`` runs the `saekit` command (what ``torchrun -m saekit`` launches)."""

import sys

from saekit.cli import main

if __name__ == "__main__":
    sys.exit(main())
