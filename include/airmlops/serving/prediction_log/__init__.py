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

**Shadow rows** (:mod:`.shadow`): what a challenger answered to a request the stable-address
proxy mirrored to it (header ``X-Airmlops-Shadow-Of: <live request id>``), stored under the
live request id apart from the live predictions in both backends (SQLite table
``shadow_predictions``, Redis namespace ``<pipeline>:shadow:``), each ``(request_id,
position)`` once and bounded like the live Redis streams (``stream_maxlen``).
:func:`read_predictions` and every monitoring reader never see them, and ``/feedback`` never
claims a label against them. They are **best-effort**: no client was told they were recorded,
so they go through a writer of their own (:func:`open_shadow_log`) that does not spill to
disk; while the backend is down they wait in a small memory buffer (``SHADOW_BUFFER_MAX``),
beyond which, and at shutdown, they are dropped and counted (the service's
``airmlops_shadow_log_dropped_total``). They never compete with live entries for the spill
directory. :func:`read_shadow_pairs` joins a window's live rows with their shadow rows and
labels, for :func:`airmlops.monitoring.shadow.compare_shadow`.
"""

from __future__ import annotations

from airmlops.serving.prediction_log.backend import LabelClaim, LogBackend
from airmlops.serving.prediction_log.reading import (
    log_redis_url,
    open_backend,
    open_log,
    open_shadow_log,
    read_labels,
    read_prediction_features,
    read_predictions,
    read_shadow_pairs,
)
from airmlops.serving.prediction_log.records import (
    LABEL_COLUMNS,
    PREDICTION_COLUMNS,
    REQUEST_ID_PATTERN,
    SHADOW_PAIR_COLUMNS,
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
    shadow_appended_key,
    shadow_stream_key,
    stream_keys,
)
from airmlops.serving.prediction_log.shadow import SHADOW_BUFFER_MAX, ShadowBackend
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
    "SHADOW_BUFFER_MAX",
    "SHADOW_PAIR_COLUMNS",
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
    "ShadowBackend",
    "SqliteLogBackend",
    "appended_key",
    "check_pipeline",
    "issued_key",
    "labeled_key",
    "log_redis_url",
    "open_backend",
    "open_log",
    "open_shadow_log",
    "read_labels",
    "read_prediction_features",
    "read_predictions",
    "read_shadow_pairs",
    "request_key",
    "shadow_appended_key",
    "shadow_stream_key",
    "spill_dir_path",
    "sqlite_log_path",
    "stream_keys",
]
