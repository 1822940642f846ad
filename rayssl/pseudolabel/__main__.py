"""``python -m rayssl.pseudolabel``: CDUL's CLIP pseudo-labelling job (the command: ``rayssl.cli.label``)."""

import sys

from rayssl.cli.label import main

if __name__ == "__main__":
    sys.exit(main())
