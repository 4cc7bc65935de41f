"""The interface every prediction log backend keeps (:class:`LogBackend`).

Labels sent to ``/feedback`` are not buffered: :meth:`~LogBackend.claim_labels` checks and
stores a request's labels in one atomic step: the request must have been issued, every entity
must be one of its entities, and an entity that already has a label is a conflict unless the
caller asks to overwrite. So "exactly one label per (request, entity)" holds across any number
of service workers and processes. When the backend is down the claim fails and the service
answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from airmlops.serving.prediction_log.records import LabelRecord, PredictionRecord


@dataclasses.dataclass(frozen=True)
class LabelClaim:
    """What :meth:`LogBackend.claim_labels` found; ``stored`` is True only when it stored."""

    issued: bool
    unknown_entities: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()

    @property
    def stored(self) -> bool:
        """The labels were stored: the request was issued, and no entity was refused."""
        return self.issued and not self.unknown_entities and not self.conflicts


class LogBackend(Protocol):
    """Where log entries are stored. Writes raise on failure; the caller retries.

    A write stores each prediction once per ``(request_id, position)`` and a label once per
    ``(request_id, entity_id)``, replacing the stored one only when it is not older, so a
    batch written twice (a retry, a replayed spill file) is stored once.
    """

    @property
    def location(self) -> str:
        """Where the entries go, without secrets."""
        ...

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None:
        """Store a batch, all of it or (raising) none."""
        ...

    def write_shadow(self, predictions: Sequence[PredictionRecord]) -> None:
        """Store shadow rows apart from the live predictions (never read as live traffic, never
        claimed by a label), each ``(request_id, position)`` once; all or (raising) none."""
        ...

    def claim_labels(self, request_id: str, labels: Sequence[LabelRecord], *,
                     overwrite: bool = False) -> LabelClaim:
        """Store ``labels`` of ``request_id`` atomically if the request was issued, predicted
        each entity, and (unless ``overwrite``) none has a label yet; else store nothing."""
        ...

    def ping(self) -> None:
        """Raise when the backend cannot be reached; return when it answers. This tells a
        backend that is down from one that refuses particular entries (the writer's
        quarantine)."""
        ...

    def close(self) -> None:
        """Let go of the connection (a later call may open a new one)."""
        ...
