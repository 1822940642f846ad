"""``python -m rayssl.data.shards``: write image shards in parallel on Ray (``rayssl.cli.shards``)."""

import sys

from rayssl.cli.shards import main

if __name__ == "__main__":
    sys.exit(main())
