"""``python -m rayssl.export``: a checkpoint's backbone for another library (the command: ``rayssl.cli.export``)."""

import sys

from rayssl.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
