"""Synthetic traffic: requests the platform sends itself, kept out of monitoring.

Deploy smoke requests, bake probes and replay dry runs carry the header
``X-Airmlops-Synthetic: <kind>``. The model service answers them like any other request but
does not write them to the prediction log, so they never appear in a monitoring window, in the
realized performance or in label matching (a label for a synthetic request gets 404). Each one
is counted by kind in the service's ``airmlops_synthetic_requests_total`` metric, so traffic that
marks itself synthetic stays visible.
"""

from __future__ import annotations

from typing import Literal

SYNTHETIC_HEADER = "X-Airmlops-Synthetic"
SyntheticKind = Literal["smoke", "probe", "replay-dry-run"]
SYNTHETIC_KINDS: tuple[str, ...] = ("smoke", "probe", "replay-dry-run")


def synthetic_headers(kind: SyntheticKind) -> dict[str, str]:
    """The header that marks a request of ``kind`` as synthetic."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic traffic kind {kind!r}; expected one of "
                         f"{list(SYNTHETIC_KINDS)}")
    return {SYNTHETIC_HEADER: kind}
