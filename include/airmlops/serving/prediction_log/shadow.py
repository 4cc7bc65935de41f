"""Where a challenger's answers to mirrored requests go: the shadow rows.

A ``/predict`` that carries ``X-Airmlops-Shadow-Of: <live request id>``
(:mod:`airmlops.serving.shadow_header`) is answered as usual, but its rows are written under the
live request id to the backend's shadow storage (:meth:`LogBackend.write_shadow`: the SQLite
table ``shadow_predictions``, the Redis namespace ``<pipeline>:shadow:``), never to the live
predictions, so no monitoring reader sees them and no label is claimed against them.

Shadow rows are best-effort: no client was ever told they were recorded. They go through a
:class:`~airmlops.serving.prediction_log.writer.PredictionLog` of their own over
:class:`ShadowBackend` (its own connection, its own writer thread, opened at the first shadow
request) **without a spill directory**: while the backend is down they wait in memory, at most
``SHADOW_BUFFER_MAX`` entries (or the log's ``buffer_size`` if smaller), beyond which they are
dropped and counted, and what is still in memory at shutdown is dropped and counted. They never
take space in the live log's spill directory or delay its replay.
"""

from __future__ import annotations

from collections.abc import Sequence

from airmlops.serving.prediction_log.backend import LabelClaim, LogBackend
from airmlops.serving.prediction_log.records import LabelRecord, PredictionRecord

SHADOW_BUFFER_MAX = 10_000
"""The most shadow entries a service worker holds in memory while the backend is down."""


class ShadowBackend:
    """``backend``'s shadow storage seen as a :class:`LogBackend`, so a
    :class:`~airmlops.serving.prediction_log.writer.PredictionLog` can buffer and write shadow
    rows: its predictions go to :meth:`LogBackend.write_shadow`; it takes no labels and issues
    no request (every claim is refused as unknown)."""

    def __init__(self, backend: LogBackend) -> None:
        self.backend = backend

    @property
    def location(self) -> str:
        """The wrapped backend's location, marked as its shadow rows."""
        return f"{self.backend.location} (shadow rows)"

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None:
        """Store ``predictions`` as shadow rows; labels are refused (they belong to the live
        log)."""
        if labels:
            raise ValueError("the shadow log takes no labels: labels are claimed for live "
                             "requests only")
        self.backend.write_shadow(predictions)

    def write_shadow(self, predictions: Sequence[PredictionRecord]) -> None:
        """Store ``predictions`` as shadow rows."""
        self.backend.write_shadow(predictions)

    def claim_labels(self, request_id: str, labels: Sequence[LabelRecord], *,
                     overwrite: bool = False) -> LabelClaim:
        """Refused as an unknown request: shadow rows never accept labels."""
        return LabelClaim(issued=False)

    def ping(self) -> None:
        """Ping the wrapped backend."""
        self.backend.ping()

    def close(self) -> None:
        """Close the wrapped backend."""
        self.backend.close()
