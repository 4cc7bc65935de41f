"""The header that marks a mirrored request: ``X-Airmlops-Shadow-Of: <live request id>``.

The stable address (:mod:`airmlops.serving.proxy`) adds it to the copy of a live ``/predict``
request it sends to a shadow slot, and strips it from every request it forwards otherwise, so a
client cannot forge one. The model service reads it to log the shadow's answer beside the live
one. Its own module so the service can import the name without importing the proxy.
"""

from __future__ import annotations

SHADOW_HEADER = "X-Airmlops-Shadow-Of"
"""Set on a mirrored request; its value is the live answer's ``X-Request-ID``."""
