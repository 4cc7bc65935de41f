"""``python -m airmlops.serving.proxy``: run the proxy process (see :mod:`.cli`)."""

from __future__ import annotations

import sys

from airmlops.serving.proxy.cli import main

sys.exit(main())
