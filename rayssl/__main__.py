"""``python -m rayssl <command>``: the ``rayssl`` console script without the script (``rayssl.cli``)."""

import sys

from rayssl.cli import main

if __name__ == "__main__":
    sys.exit(main())
