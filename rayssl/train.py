"""``python -m rayssl.train``: pretrain a backbone on Ray Train (the command: ``rayssl.cli.train``).

This form is what ``ray job submit -- python -m rayssl.train ...`` runs on a cluster.
"""

import sys

from rayssl.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
