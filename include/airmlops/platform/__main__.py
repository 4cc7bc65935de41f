"""``python -m airmlops.platform up|down|status``: the same commands as ``airmlops platform``."""

import sys

from airmlops.platform.commands import main

if __name__ == "__main__":
    sys.exit(main())
