"""`python -m service serve|keys ...`: the same commands as `reid serve|keys`."""
from __future__ import annotations

import sys

from reid.cli import main

if __name__ == "__main__":
    sys.exit(main())
