"""``python -m tuning.sweep``: a Ray Tune sweep of full training runs (the command: ``rayssl.cli.sweep``;
the sweep: ``tuning.runner``)."""

import sys

from rayssl.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
