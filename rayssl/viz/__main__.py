"""``python -m rayssl.viz``: draw a run's pictures as PNG files (the command: ``rayssl.cli.viz``)."""

import sys

from rayssl.cli.viz import main

if __name__ == "__main__":
    sys.exit(main())
