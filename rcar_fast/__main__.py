"""``python -m rcar_fast``: the command line (rcar_fast.app.cli; console script ``rcar-fast``)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
