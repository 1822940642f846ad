"""``python -m rayssl.data.scenes``: write the built-in scenes as image files (``rayssl.cli.scenes``)."""

import sys

from rayssl.cli.scenes import main

if __name__ == "__main__":
    sys.exit(main())
