"""``python -m rayssl.bench``: the throughput benchmark (the command: ``rayssl.cli.bench``)."""

import sys

from rayssl.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
