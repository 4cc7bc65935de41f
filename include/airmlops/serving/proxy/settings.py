"""The proxy's defaults and fixed timings (the command line may change the defaults)."""

from __future__ import annotations

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_HEALTH_INTERVAL = 0.5
HEALTH_TIMEOUT = 1.0
"""Seconds an active check waits for ``/readyz``."""
HEALTH_FALL = 2
"""Failed active checks in a row that mark an upstream down."""
VERIFY_TIMEOUT = 5.0
"""Seconds a switch waits for the new upstreams' ``/readyz``."""
KEEPALIVE_EXPIRY = 2.0
"""Idle upstream connections are dropped after this many seconds: shorter than the upstream's
own keep-alive timeout (uvicorn's and BentoML's default is 5 s), so the proxy never sends a
request on a connection the upstream is closing."""
