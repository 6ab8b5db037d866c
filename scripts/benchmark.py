"""The speed benchmark (`nfcv.bench`): ``python scripts/benchmark.py --help``."""

import sys

from nfcv.bench import main

if __name__ == "__main__":
    sys.exit(main())
