"""The prediction log: every answered prediction and every label that arrives later.

Two backends behind one small interface, :class:`LogBackend` (:mod:`.backend`):
:class:`SqliteLogBackend` (:mod:`.sqlite`, the embedded default) and :class:`RedisLogBackend`
(:mod:`.redis_backend`, when a Redis URL is configured). Both store each prediction once per
``(request_id, position)`` and each label once per ``(request_id, entity_id)``, so a batch
written twice is stored once; ``/feedback`` labels are claimed atomically
(:meth:`LogBackend.claim_labels`).

:class:`PredictionLog` (:mod:`.writer`) is what the model service writes through: it buffers in
memory and writes from a background thread, spilling to disk (:mod:`.spill`) while the backend
is down. :func:`read_predictions` and :func:`read_labels` (:mod:`.reading`) return a time window
as a DataFrame, from either backend. The record types and columns are in :mod:`.records`.
"""

from __future__ import annotations

from airmlops.serving.prediction_log.backend import LabelClaim, LogBackend
from airmlops.serving.prediction_log.reading import (
    log_redis_url,
    open_backend,
    open_log,
    read_labels,
    read_predictions,
)
from airmlops.serving.prediction_log.records import (
    LABEL_COLUMNS,
    PREDICTION_COLUMNS,
    REQUEST_ID_PATTERN,
    LabelRecord,
    LogState,
    LogStats,
    Observer,
    PredictionRecord,
    check_pipeline,
)
from airmlops.serving.prediction_log.redis_backend import (
    CLOCK_SKEW_US,
    RedisLogBackend,
    appended_key,
    issued_key,
    labeled_key,
    request_key,
    stream_keys,
)
from airmlops.serving.prediction_log.spill import (
    SPILL_FILE_PATTERN,
    SPILL_TEMP_PATTERN,
    spill_dir_path,
)
from airmlops.serving.prediction_log.sqlite import SqliteLogBackend, sqlite_log_path
from airmlops.serving.prediction_log.writer import ADOPT_INTERVAL_S, PredictionLog
from airmlops.settings import PredictionLogSettings

__all__ = [
    "ADOPT_INTERVAL_S",
    "CLOCK_SKEW_US",
    "LABEL_COLUMNS",
    "PREDICTION_COLUMNS",
    "REQUEST_ID_PATTERN",
    "SPILL_FILE_PATTERN",
    "SPILL_TEMP_PATTERN",
    "LabelClaim",
    "LabelRecord",
    "LogBackend",
    "LogState",
    "LogStats",
    "Observer",
    "PredictionLog",
    "PredictionLogSettings",
    "PredictionRecord",
    "RedisLogBackend",
    "SqliteLogBackend",
    "appended_key",
    "check_pipeline",
    "issued_key",
    "labeled_key",
    "log_redis_url",
    "open_backend",
    "open_log",
    "read_labels",
    "read_predictions",
    "request_key",
    "spill_dir_path",
    "sqlite_log_path",
    "stream_keys",
]
