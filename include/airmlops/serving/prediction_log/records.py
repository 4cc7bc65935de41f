"""What the prediction log holds: its record types, their columns, and the checks and JSON
encoding every backend shares.

``ts`` is the prediction's (or label's) time in epoch microseconds, UTC; ``inputs`` is the
request row (entity and request fields) and ``features`` the model's input row, both JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from airmlops.names import is_name

REQUEST_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
PREDICTION_COLUMNS = (
    "request_id", "position", "ts", "model_version", "entity_id", "inputs", "features",
    "prediction", "probability",
)
LABEL_COLUMNS = ("request_id", "entity_id", "label", "ts")
SHADOW_PAIR_COLUMNS = (
    "request_id", "position", "entity_id", "ts", "live_version", "shadow_version",
    "live_prediction", "live_probability", "shadow_prediction", "shadow_probability", "label",
)
"""The columns of :func:`~airmlops.serving.prediction_log.read_shadow_pairs`."""

Observer = Callable[[str, int], None]
"""``observer(event, amount)``: event is ``logged``, ``labels_logged``, ``failed_writes``,
``dropped``, ``quarantined`` (increments) or ``buffered``, ``spilled``, ``backend_up``
(current values)."""


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
    """One predicted entity of one request."""

    request_id: str
    position: int
    ts_us: int
    model_version: str
    entity_id: str
    inputs: Mapping[str, Any]
    features: Mapping[str, Any]
    prediction: float
    probability: float | None


@dataclasses.dataclass(frozen=True)
class LabelRecord:
    """The observed outcome of one entity of an earlier request."""

    request_id: str
    entity_id: str
    label: float
    ts_us: int


Record = PredictionRecord | LabelRecord
"""One log entry: what the writer buffers, spills and replays."""

LogState = Literal["ok", "spilling"]


@dataclasses.dataclass(frozen=True)
class LogStats:
    """Counters of a :class:`PredictionLog` since it started, and where its entries are.

    ``buffered`` entries are in memory, ``spilled`` ones in spill files (this log's own and the
    orphans it adopted); ``state`` is ``spilling`` while any are on disk, else ``ok``.
    ``seconds_since_drop`` is the time since an entry was last dropped (None: never).
    ``quarantined`` entries were refused by a backend that answers and set aside on disk
    (:mod:`~airmlops.serving.prediction_log.writer`).
    """

    logged: int
    labels_logged: int
    buffered: int
    spilled: int
    failed_writes: int
    dropped: int
    backend_up: bool
    state: LogState
    seconds_since_drop: float | None
    quarantined: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (the service's ``/readyz`` body)."""
        return dataclasses.asdict(self)


def split_records(records: list[Record]) -> tuple[list[PredictionRecord], list[LabelRecord]]:
    """The predictions and the labels of a batch, each in their order."""
    predictions = [r for r in records if isinstance(r, PredictionRecord)]
    labels = [r for r in records if isinstance(r, LabelRecord)]
    return predictions, labels


def to_json(value: Mapping[str, Any]) -> str:
    """Compact JSON of a row; NaN must have been cleaned out (:func:`clean_row`)."""
    return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    """A JSON-ready value: numpy scalars become Python ones, NaN (missing) becomes null."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with string keys and JSON-ready values (see :func:`_finite`)."""
    return {str(k): _finite(v) for k, v in row.items()}


def check_pipeline(pipeline: str) -> str:
    """Return ``pipeline`` if it is a valid pipeline name (it becomes a file or key name)."""
    if not is_name(pipeline):
        raise ValueError(f"invalid pipeline name {pipeline!r}")
    return pipeline


def check_request_id(request_id: str) -> str:
    """Return ``request_id`` if it is 32 hex digits (it becomes part of a key name)."""
    if not isinstance(request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise ValueError(f"invalid request id {request_id!r}: expected 32 hex digits")
    return request_id
