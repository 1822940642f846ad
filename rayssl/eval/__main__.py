"""``python -m rayssl.eval``: score a checkpoint's frozen backbone (the command: ``rayssl.cli.eval``)."""

import sys

from rayssl.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
