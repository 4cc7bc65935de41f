"""The prediction log: every answered prediction and every label that arrives later.

Two backends behind one small interface, :class:`LogBackend`:

- :class:`SqliteLogBackend` (the embedded default): ``<data_root>/predictions/<pipeline>.sqlite``
  in WAL mode with two tables. ``predictions`` has one row per predicted entity:
  ``(request_id, position, ts, model_version, entity_id, inputs, features, prediction,
  probability)``, keyed ``(request_id, position)`` (``position`` is the entity's index in its
  request) and written with ``INSERT OR IGNORE``, so a batch written twice (a retry after a
  failed commit, a replayed spill file) is stored once. ``labels`` has ``(request_id,
  entity_id, label, ts)`` keyed ``(request_id, entity_id)``; a label replaces the stored one
  only if it is not older, so a replayed label never undoes a later one.
- :class:`RedisLogBackend` (when a Redis URL is configured): the streams
  ``<pipeline>:predictions`` and ``<pipeline>:labels``, one entry per row with the same fields,
  appended with ``XADD ... MAXLEN ~ <bound>`` by one Lua script call per batch (atomic). The
  script keeps the hash ``<pipeline>:appended:<request_id>`` of what it appended for a request
  (``p<position>``, and ``l<entity>`` -> ``<ts> <label>`` for labels written through the log)
  and skips a row already there, so a batch written twice is appended once (readers also drop
  duplicate ``(request_id, position)`` entries). The same call adds each row's entity to the
  set ``<pipeline>:request:<request_id>``: the record that the request was issued, which labels
  are checked against (it holds entity ids only). Both expire after ``label_window_days``. The
  sorted set ``<pipeline>:issued`` orders those records by time, and the script drops the
  oldest (with their labels' hash and their appended hash) beyond ``stream_maxlen`` requests,
  so the records are bounded like the streams, whatever the traffic.

Labels sent to ``/feedback`` are not buffered: :meth:`~LogBackend.claim_labels` checks and
stores a request's labels in one atomic step (one SQLite ``BEGIN IMMEDIATE`` transaction; one
Lua script on Redis, which keeps the labels given so far in the hash
``<pipeline>:labeled:<request_id>``): the request must have been issued, every entity must be
one of its entities, and an entity that already has a label is a conflict unless the caller
asks to overwrite. So "exactly one label per (request, entity)" holds across any number of
service workers and processes. When the backend is down the claim fails and the service
answers 503 with ``Retry-After``.

``ts`` is the prediction's (or label's) time in epoch microseconds, UTC; ``inputs`` is the
request row (entity and request fields) and ``features`` the model's input row, both JSON.

:class:`PredictionLog` is what the model service writes through. :meth:`~PredictionLog.log`
only appends to a bounded in-memory buffer and returns; a background thread writes the buffer
in batches (``executemany`` / one script call). What it does when the backend is down:

- **Spill.** With a spill directory (``<data_root>/prediction-log/spill/<pipeline>/``, mode
  0700) a batch whose write failed is appended, in order, to the writer's own spill file
  (``<pid>-<random>.jsonl``: a header line naming the backend, then one JSON entry per line,
  tagged ``prediction`` or ``label``; floats round-trip exactly) and leaves memory. While the
  backend is down, and while a spill is being replayed, newer entries follow it to the file in
  batches (after the same linger), so memory holds only what arrived in the last linger
  interval. **Fsync policy:** the file is fsync'ed after each spilled batch (at most
  ``batch_size`` entries; batches are spilled only while the backend is down or a spill is
  replayed), before the entries count as spilled. At :meth:`~PredictionLog.close`, entries not
  yet written are spilled, not dropped.
- **Replay.** The writer probes the backend with the retry backoff (``retry_initial`` doubling
  to ``retry_max`` seconds) by writing the next spilled chunk (``batch_size`` entries). Once
  it answers, the spill is replayed in order, before any newer entry, and the file is deleted
  when it is all written.
- **Exactly once.** The file is deleted only after its last chunk is committed, so a crash in
  between replays a chunk again; both backends store a prediction once per ``(request_id,
  position)`` and a label once per ``(request_id, entity_id)`` (only a newer label is stored
  after it), so nothing is stored twice. On Redis this holds while the request's records are
  kept (``label_window_days``, the last ``stream_maxlen`` requests).
- **Orphans.** Each spill file is held with an exclusive ``flock`` by its writer. At start,
  and every few seconds after a successful write, a log adopts the spill files of the same
  directory whose lock it can take (their writer died: a killed worker, a closed log) and whose
  header names its own backend, replays them and deletes them.
- **Disk bound.** The spill directory of a pipeline holds at most ``spill_max_bytes`` (all
  workers' files together); beyond it entries are dropped and counted (``dropped``), with one
  ERROR line per episode (until the spill is replayed).
- **What can still be lost.** Without a spill directory (``spill_max_bytes=0``) entries wait in
  memory (up to ``buffer_size``, beyond which they are dropped) and are dropped at close. With
  one, a ``kill -9`` of a worker loses what is in its memory and not yet written or spilled:
  the entries of the last linger interval plus the batch in flight (more if one backend call
  hangs until its timeout: what arrived meanwhile). A crash of the machine can lose the spilled
  batch whose fsync had not returned.

Counters (logged, buffered, spilled, failed writes, dropped) and the state (``ok`` or
``spilling``) are in :meth:`~PredictionLog.stats` and are pushed to an optional ``observer`` as
they change (the service turns them into Prometheus metrics and its ``/readyz`` body).

:func:`read_predictions` and :func:`read_labels` return a time window as a DataFrame, from
either backend (the monitoring DAG reads the log through them).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from airmlops.paths import _fsync_directory, safe_join
from airmlops.settings import PredictionLogSettings

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.settings import Settings

log = logging.getLogger(__name__)

PIPELINE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
REQUEST_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
PREDICTION_COLUMNS = (
    "request_id", "position", "ts", "model_version", "entity_id", "inputs", "features",
    "prediction", "probability",
)
LABEL_COLUMNS = ("request_id", "entity_id", "label", "ts")
CLOCK_SKEW_US = 300 * 1_000_000
"""How much earlier than a prediction's own ``ts`` a Redis stream id may be (clock skew
between the service and the Redis server); the window read starts this much early."""
SPILL_FILE_PATTERN = re.compile(r"^[0-9]{1,10}-[0-9a-f]{16}\.jsonl$")
"""A spill file's name: ``<pid>-<random>.jsonl``."""
SPILL_TEMP_PATTERN = re.compile(r"^\.[0-9]{1,10}-[0-9a-f]{16}\.jsonl\.tmp$")
"""A spill file being created (renamed to its name once locked and headed)."""
ADOPT_INTERVAL_S = 5.0
"""How often (at most) a log looks for orphaned spill files after a successful write."""

Observer = Callable[[str, int], None]
"""``observer(event, amount)``: event is ``logged``, ``labels_logged``, ``failed_writes``,
``dropped`` (increments) or ``buffered``, ``spilled``, ``backend_up`` (current values)."""


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


LogState = Literal["ok", "spilling"]


@dataclasses.dataclass(frozen=True)
class LogStats:
    """Counters of a :class:`PredictionLog` since it started, and where its entries are.

    ``buffered`` entries are in memory, ``spilled`` ones in spill files (this log's own and the
    orphans it adopted); ``state`` is ``spilling`` while any are on disk, else ``ok``.
    ``seconds_since_drop`` is the time since an entry was last dropped (None: never).
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LabelClaim:
    """What :meth:`LogBackend.claim_labels` found; ``stored`` is True only when it stored."""

    issued: bool
    unknown_entities: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()

    @property
    def stored(self) -> bool:
        return self.issued and not self.unknown_entities and not self.conflicts


class LogBackend(Protocol):
    """Where log entries are stored. Writes raise on failure; the caller retries."""

    @property
    def location(self) -> str:
        """Where the entries go, without secrets."""
        ...

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None: ...

    def claim_labels(self, request_id: str, labels: Sequence[LabelRecord], *,
                     overwrite: bool = False) -> LabelClaim:
        """Store ``labels`` of ``request_id`` atomically if the request was issued, predicted
        each entity, and (unless ``overwrite``) none has a label yet; else store nothing."""
        ...

    def close(self) -> None: ...


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    """A JSON-ready value: numpy scalars become Python ones, NaN (missing) becomes null."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _finite(v) for k, v in row.items()}


def check_pipeline(pipeline: str) -> str:
    """Return ``pipeline`` if it is a valid pipeline name (it becomes a file or key name)."""
    if not isinstance(pipeline, str) or not PIPELINE_PATTERN.match(pipeline):
        raise ValueError(f"invalid pipeline name {pipeline!r}")
    return pipeline


# --- SQLite ----------------------------------------------------------------------------------

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS predictions ("
    " request_id TEXT NOT NULL, position INTEGER NOT NULL, ts INTEGER NOT NULL,"
    " model_version TEXT NOT NULL, entity_id TEXT NOT NULL, inputs TEXT NOT NULL,"
    " features TEXT NOT NULL, prediction REAL, probability REAL,"
    " PRIMARY KEY (request_id, position))",
    "CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)",
    "CREATE TABLE IF NOT EXISTS labels ("
    " request_id TEXT NOT NULL, entity_id TEXT NOT NULL, label REAL NOT NULL,"
    " ts INTEGER NOT NULL, PRIMARY KEY (request_id, entity_id))",
    "CREATE INDEX IF NOT EXISTS labels_ts ON labels (ts)",
)


def sqlite_log_path(data_root: Path, pipeline: str) -> Path:
    """``<data_root>/predictions/<pipeline>.sqlite``."""
    return safe_join(Path(data_root), "predictions", f"{check_pipeline(pipeline)}.sqlite")


class SqliteLogBackend:
    """The log in one SQLite file (WAL): safe for several writer processes (busy timeout).

    The connection is opened on first use, in the thread that writes (the log's writer thread).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    @property
    def location(self) -> str:
        return f"sqlite:{self.path}"

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                for statement in _SQLITE_SCHEMA:
                    db.execute(statement)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None:
        """Insert a batch in one transaction: a prediction already present is left as it is,
        a label replaces the stored one unless that one is newer."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            if predictions:
                db.executemany(
                    "INSERT OR IGNORE INTO predictions (request_id, position, ts, model_version,"
                    " entity_id, inputs, features, prediction, probability)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(r.request_id, r.position, r.ts_us, r.model_version, r.entity_id,
                      _json(_clean(r.inputs)), _json(_clean(r.features)), r.prediction,
                      r.probability) for r in predictions],
                )
            if labels:
                db.executemany(
                    "INSERT INTO labels (request_id, entity_id, label, ts) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (request_id, entity_id) DO UPDATE"
                    " SET label = excluded.label, ts = excluded.ts WHERE excluded.ts >= labels.ts",
                    [(r.request_id, r.entity_id, r.label, r.ts_us) for r in labels],
                )
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                self.close()  # a broken connection is reopened on the next write
            raise

    def claim_labels(self, request_id: str, labels: Sequence[LabelRecord], *,
                     overwrite: bool = False) -> LabelClaim:
        """One ``BEGIN IMMEDIATE`` transaction: SQLite's write lock makes the check and the
        insert one step for every process writing this file."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            issued = {row[0] for row in db.execute(
                "SELECT entity_id FROM predictions WHERE request_id = ?", (request_id,))}
            claim = LabelClaim(issued=bool(issued), unknown_entities=tuple(
                r.entity_id for r in labels if issued and r.entity_id not in issued))
            if claim.stored and not overwrite:
                labelled = {row[0] for row in db.execute(
                    "SELECT entity_id FROM labels WHERE request_id = ?", (request_id,))}
                claim = LabelClaim(issued=True, conflicts=tuple(
                    r.entity_id for r in labels if r.entity_id in labelled))
            if claim.stored:
                db.executemany(
                    "INSERT OR REPLACE INTO labels (request_id, entity_id, label, ts)"
                    " VALUES (?, ?, ?, ?)",
                    [(request_id, r.entity_id, r.label, r.ts_us) for r in labels])
                db.execute("COMMIT")
            else:
                db.execute("ROLLBACK")
            return claim
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                self.close()
            raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# --- Redis -----------------------------------------------------------------------------------


def stream_keys(pipeline: str) -> tuple[str, str]:
    """The (predictions, labels) stream keys of a pipeline."""
    check_pipeline(pipeline)
    return f"{pipeline}:predictions", f"{pipeline}:labels"


def request_key(pipeline: str, request_id: str) -> str:
    """The set of entities request ``request_id`` predicted (Redis)."""
    return f"{check_pipeline(pipeline)}:request:{_check_request_id(request_id)}"


def issued_key(pipeline: str) -> str:
    """The sorted set of issued request ids by time, which bounds their records (Redis)."""
    return f"{check_pipeline(pipeline)}:issued"


def labeled_key(pipeline: str, request_id: str) -> str:
    """The hash entity -> label of the labels request ``request_id`` got so far (Redis)."""
    return f"{check_pipeline(pipeline)}:labeled:{_check_request_id(request_id)}"


def appended_key(pipeline: str, request_id: str) -> str:
    """The hash of the rows of request ``request_id`` the log has appended (Redis): field
    ``p<position>`` per prediction, ``l<entity>`` -> ``<ts> <label>`` per logged label."""
    return f"{check_pipeline(pipeline)}:appended:{_check_request_id(request_id)}"


def _check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise ValueError(f"invalid request id {request_id!r}: expected 32 hex digits")
    return request_id


def _redis_client(url: str, *, timeout: float) -> Any:
    import redis

    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError("the Redis URL must start with redis://, rediss:// or unix://")
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                decode_responses=False)


def _redis_location(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


_APPEND_SCRIPT = """
-- KEYS: predictions stream, labels stream, the issued-requests sorted set, then each
-- prediction row's request key and appended key, then each label row's appended key
-- ARGV: maxlen, prediction rows, label rows, request key ttl (s), the pipeline's key prefix,
-- then each row's field/value pairs (9 pairs per prediction, 4 per label: RedisLogBackend.write)
-- A row already appended (its (request, position), or its label with the same or a later ts)
-- is skipped: a batch written twice is appended once.
local maxlen = ARGV[1]
local predictions = tonumber(ARGV[2])
local ttl = ARGV[4]
local at = 6
for row = 1, predictions do
  local request, appended = KEYS[2 + 2 * row], KEYS[3 + 2 * row]
  if redis.call('HSETNX', appended, 'p' .. ARGV[at + 3], '1') == 1 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, at, at + 17))
    redis.call('SADD', request, ARGV[at + 9])
    redis.call('EXPIRE', request, ttl)
    redis.call('EXPIRE', appended, ttl)
    redis.call('ZADD', KEYS[3], 'NX', ARGV[at + 5], ARGV[at + 1])
  end
  at = at + 18
end
for row = 1, tonumber(ARGV[3]) do
  local appended, field = KEYS[3 + 2 * predictions + row], 'l' .. ARGV[at + 3]
  local label, ts = ARGV[at + 5], tonumber(ARGV[at + 7])
  local previous = redis.call('HGET', appended, field)
  local newer = true
  if previous then
    local space = string.find(previous, ' ', 1, true)
    local previous_ts = tonumber(string.sub(previous, 1, space - 1))
    newer = ts > previous_ts or (ts == previous_ts and label ~= string.sub(previous, space + 1))
  end
  if newer then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, at, at + 7))
    redis.call('HSET', appended, field, ARGV[at + 7] .. ' ' .. label)
    redis.call('EXPIRE', appended, ttl)
  end
  at = at + 8
end
-- The records of issued requests are bounded like the streams: the oldest go first.
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(maxlen)
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[3], excess)
  for i = 1, #oldest, 2 do
    redis.call('DEL', ARGV[5] .. 'request:' .. oldest[i], ARGV[5] .. 'labeled:' .. oldest[i],
               ARGV[5] .. 'appended:' .. oldest[i])
  end
end
return at
"""


_CLAIM_SCRIPT = """
-- KEYS: the request's entity set, its labeled hash, the labels stream
-- ARGV: maxlen, overwrite (1/0), ttl (s), request id, then entity, label, ts per label
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_request'} end
local unknown, conflicts = {'unknown_entities'}, {'conflicts'}
for at = 5, #ARGV, 3 do
  if redis.call('SISMEMBER', KEYS[1], ARGV[at]) == 0 then table.insert(unknown, ARGV[at]) end
end
if #unknown > 1 then return unknown end
if ARGV[2] ~= '1' then
  for at = 5, #ARGV, 3 do
    if redis.call('HEXISTS', KEYS[2], ARGV[at]) == 1 then table.insert(conflicts, ARGV[at]) end
  end
  if #conflicts > 1 then return conflicts end
end
for at = 5, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[at], ARGV[at + 1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'request_id', ARGV[4],
             'entity_id', ARGV[at], 'label', ARGV[at + 1], 'ts', ARGV[at + 2])
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {'stored'}
"""


class RedisLogBackend:
    """The log as two Redis Streams, each bounded by ``XADD MAXLEN ~ maxlen``.

    A batch is appended by one Lua script call (atomic, one round trip): the entries are the
    same as one XADD each, without packing and parsing a command and a reply per entry here,
    which made this writer thread a sixth of the service's CPU under load.
    """

    def __init__(self, url: str, pipeline: str, *, maxlen: int = 1_000_000,
                 timeout: float = 2.0, client: Any = None,
                 label_window_s: float = 90 * 86_400) -> None:
        self.url = url
        self.pipeline = check_pipeline(pipeline)
        self.maxlen = int(maxlen)
        self.label_window_s = max(1, int(label_window_s))
        self.predictions_key, self.labels_key = stream_keys(pipeline)
        self._client = client or _redis_client(url, timeout=timeout)
        self._append = self._client.register_script(_APPEND_SCRIPT)
        self._claim = self._client.register_script(_CLAIM_SCRIPT)

    @property
    def location(self) -> str:
        return f"{_redis_location(self.url)} streams {self.predictions_key}, {self.labels_key}"

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None:
        """XADD the batch in one script call: all of it is appended or none, and rows
        appended before (a retried or replayed batch) are not appended again."""
        if not predictions and not labels:
            return
        args: list[Any] = [self.maxlen, len(predictions), len(labels), self.label_window_s,
                           f"{self.pipeline}:"]
        for r in predictions:
            args += (
                "request_id", r.request_id, "position", r.position, "ts", r.ts_us,
                "model_version", r.model_version, "entity_id", r.entity_id,
                "inputs", _json(_clean(r.inputs)), "features", _json(_clean(r.features)),
                "prediction", repr(float(r.prediction)),
                "probability", "" if r.probability is None else repr(float(r.probability)),
            )
        for r in labels:
            args += ("request_id", r.request_id, "entity_id", r.entity_id,
                     "label", repr(float(r.label)), "ts", r.ts_us)
        keys = [self.predictions_key, self.labels_key, issued_key(self.pipeline)]
        for r in predictions:
            keys += (request_key(self.pipeline, r.request_id),
                     appended_key(self.pipeline, r.request_id))
        keys += (appended_key(self.pipeline, r.request_id) for r in labels)
        self._append(keys=keys, args=args)

    def claim_labels(self, request_id: str, labels: Sequence[LabelRecord], *,
                     overwrite: bool = False) -> LabelClaim:
        """One Lua script: Redis runs it atomically, whichever worker calls it."""
        args: list[Any] = [self.maxlen, 1 if overwrite else 0, self.label_window_s, request_id]
        for r in labels:
            args += (r.entity_id, repr(float(r.label)), r.ts_us)
        keys = [request_key(self.pipeline, request_id), labeled_key(self.pipeline, request_id),
                self.labels_key]
        outcome, *entities = [part.decode("utf-8") for part in
                              self._claim(keys=keys, args=args)]
        if outcome == "unknown_request":
            return LabelClaim(issued=False)
        if outcome == "unknown_entities":
            return LabelClaim(issued=True, unknown_entities=tuple(entities))
        if outcome == "conflicts":
            return LabelClaim(issued=True, conflicts=tuple(entities))
        return LabelClaim(issued=True)

    def close(self) -> None:
        self._client.close()


# --- spill files -----------------------------------------------------------------------------

_READ_BLOCK = 1 << 20
_ABANDONED_TEMP_S = 60.0


def spill_dir_path(data_root: Path, pipeline: str) -> Path:
    """``<data_root>/prediction-log/spill/<pipeline>``: where the log of ``pipeline`` spills."""
    return safe_join(Path(data_root), "prediction-log", "spill", check_pipeline(pipeline))


def _encode_spill_entry(record: PredictionRecord | LabelRecord) -> bytes:
    """One spill line: the record as JSON tagged with its kind. Python writes a float as its
    shortest repr, which reads back as the same float (NaN and infinities as NaN/Infinity)."""
    if isinstance(record, PredictionRecord):
        entry: dict[str, Any] = {
            "kind": "prediction", "request_id": record.request_id,
            "position": int(record.position), "ts_us": int(record.ts_us),
            "model_version": record.model_version, "entity_id": record.entity_id,
            "inputs": _clean(record.inputs), "features": _clean(record.features),
            "prediction": float(record.prediction),
            "probability": None if record.probability is None else float(record.probability),
        }
    else:
        entry = {"kind": "label", "request_id": record.request_id, "entity_id": record.entity_id,
                 "label": float(record.label), "ts_us": int(record.ts_us)}
    return (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def _decode_spill_entry(line: bytes) -> PredictionRecord | LabelRecord:
    entry = json.loads(line)
    kind = entry.pop("kind")
    if kind == "prediction":
        return PredictionRecord(**entry)
    if kind == "label":
        return LabelRecord(**entry)
    raise ValueError(f"unknown spill entry kind {kind!r}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclasses.dataclass(eq=False)
class _SpillFile:
    """A spill file whose lock this log holds: its own (appended to), or an adopted orphan."""

    path: Path
    fd: int
    offset: int
    """Where the next entry to replay starts."""
    size: int
    entries: int
    """Entries not replayed yet."""
    own: bool

    @property
    def replayed(self) -> bool:
        return self.offset >= self.size

    def close(self, *, delete: bool) -> None:
        """Release the lock; delete the file first when it is all replayed."""
        try:
            if delete:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


# --- the non-blocking writer -----------------------------------------------------------------


class PredictionLog:
    """Buffers log entries in memory and writes them from a background thread.

    :meth:`log` and :meth:`log_labels` never block on the backend: they append to a buffer of
    at most ``buffer_size`` entries (beyond it, new entries are dropped and counted) and return.
    The writer takes up to ``batch_size`` entries at a time, in order, and removes them only
    once the backend has stored them (or, with a ``spill_dir``, spilled them to disk: see the
    module docstring). A failed write is counted and the backend is tried again after a backoff
    (``retry_initial`` doubling up to ``retry_max`` seconds) until it answers or the log is
    closed. With ``linger`` (seconds) the writer waits that long after the first entry for more
    before a write (or a spill) that would not be full, so one call carries many entries; a
    :meth:`flush` or :meth:`close` cuts the wait short. Call :meth:`close` to flush (bounded by
    a timeout), spill what is left and stop.

    The spill directory holds at most ``spill_max_bytes`` (every file in it, whoever wrote it).
    """

    def __init__(
        self,
        backend: LogBackend,
        *,
        buffer_size: int = 100_000,
        batch_size: int = 1000,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        linger: float = 0.0,
        observer: Observer | None = None,
        spill_dir: Path | None = None,
        spill_max_bytes: int = 1 << 30,
    ) -> None:
        if buffer_size < 1 or batch_size < 1:
            raise ValueError("buffer_size and batch_size must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        if spill_max_bytes < 0:
            raise ValueError("spill_max_bytes must not be negative")
        self.linger = linger
        self._flushing = 0
        self.backend = backend
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._observer = observer
        self._buffer: deque[PredictionRecord | LabelRecord] = deque()
        self._in_flight = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._logged = 0
        self._labels_logged = 0
        self._failed_writes = 0
        self._dropped = 0
        self._last_drop: float | None = None
        self._backend_up = True
        self._retry_at = 0.0
        self._retry_delay = retry_initial
        # Spilling (the writer thread's own state, but for the _spilled count).
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.spill_max_bytes = spill_max_bytes
        self._spilled = 0
        self._own: _SpillFile | None = None
        self._adopted: list[_SpillFile] = []
        self._foreign: set[str] = set()
        self._spill_due: float | None = None
        self._spill_full_logged = False
        self._last_adopt = 0.0
        self._header = (json.dumps({"spill": 1, "backend": backend.location}) + "\n").encode()
        if self.spill_dir is not None:
            self._open_spill_dir()
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer",
                                        daemon=True)
        self._thread.start()

    # -- producers ------------------------------------------------------------------------

    def log(self, records: Sequence[PredictionRecord]) -> int:
        """Buffer prediction records; return how many were accepted (the rest are dropped)."""
        return self._append(records)

    def log_labels(self, records: Sequence[LabelRecord]) -> int:
        """Buffer label records; return how many were accepted (the rest are dropped)."""
        return self._append(records)

    def _append(self, records: Sequence[PredictionRecord | LabelRecord]) -> int:
        if not records:
            return 0
        with self._condition:
            if self._stopping:
                accepted = 0
            else:
                room = self.buffer_size - len(self._buffer) - self._in_flight
                accepted = max(0, min(room, len(records)))
                was_empty = not self._buffer
                self._buffer.extend(records[:accepted])
                # Wake the writer when it may be idle or has a full batch; while it lingers,
                # waking it for every entry would only cost CPU.
                if was_empty or not self.linger or len(self._buffer) >= self.batch_size:
                    self._condition.notify_all()
            dropped = len(records) - accepted
            if dropped:
                self._dropped += dropped
                self._last_drop = time.monotonic()
            buffered = len(self._buffer) + self._in_flight
        if dropped:
            log.warning("prediction log buffer full (%d entries): dropped %d", self.buffer_size,
                        dropped)
            self._notify("dropped", dropped)
        self._notify("buffered", buffered)
        return accepted

    # -- state ------------------------------------------------------------------------------

    def stats(self) -> LogStats:
        with self._condition:
            since = None if self._last_drop is None else \
                round(time.monotonic() - self._last_drop, 3)
            return LogStats(
                logged=self._logged,
                labels_logged=self._labels_logged,
                buffered=len(self._buffer) + self._in_flight,
                spilled=self._spilled,
                failed_writes=self._failed_writes,
                dropped=self._dropped,
                backend_up=self._backend_up,
                state="spilling" if self._spilled else "ok",
                seconds_since_drop=since,
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted entry (and every spilled one) is stored; False if
        ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._condition:
            self._flushing += 1  # the writer stops lingering
            self._condition.notify_all()
            try:
                while self._buffer or self._in_flight or self._spilled:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._condition.wait(min(remaining, 0.5))
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush for at most ``timeout`` seconds, stop the writer and close the backend.

        Returns True when everything accepted was stored. With a spill directory, entries not
        written are spilled (a later log on the directory replays them); without one they are
        counted as dropped.
        """
        flushed = self.flush(timeout)
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=max(1.0, self.retry_max + 1.0))
        with self._condition:
            lost = len(self._buffer) + self._in_flight
            self._buffer.clear()
            self._in_flight = 0
            self._dropped += lost
            if lost:
                self._last_drop = time.monotonic()
        if lost:
            log.warning("prediction log closed with %d entries unwritten", lost)
            self._notify("dropped", lost)
        try:
            self.backend.close()
        except Exception:  # closing a broken connection must not fail shutdown
            log.debug("closing the prediction log backend failed", exc_info=True)
        return flushed and not lost

    # -- writer thread ------------------------------------------------------------------------

    def _notify(self, event: str, amount: int) -> None:
        if self._observer is None:
            return
        try:
            self._observer(event, amount)
        except Exception:  # metrics must never break logging
            log.debug("prediction log observer failed on %s", event, exc_info=True)

    def _linger(self) -> None:
        """Wait (holding the condition) up to ``linger`` seconds for a full batch."""
        deadline = time.monotonic() + self.linger
        while (len(self._buffer) < self.batch_size and not self._stopping
               and not self._flushing):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _has_spill(self) -> bool:
        """Entries are on disk: they go to the backend before anything in memory."""
        return bool(self._adopted) or (self._own is not None and not self._own.replayed)

    def _next_step(self) -> str:
        """Wait (holding the condition) until there is work; say which: ``spill`` a batch
        from memory, ``replay`` a spilled chunk, ``write`` a batch from memory, or ``stop``."""
        while True:
            if self._stopping:
                return "stop"
            now = time.monotonic()
            due = now >= self._retry_at
            # Memory queues behind the spill, and goes to disk while the backend is down.
            to_disk = self.spill_dir is not None and bool(self._buffer) and \
                (self._has_spill() or not due)
            if to_disk:
                if self._spill_due is None:
                    self._spill_due = now + self.linger
                if (len(self._buffer) >= self.batch_size or self._flushing
                        or now >= self._spill_due):
                    return "spill"
            if due and self._has_spill():
                return "replay"
            if due and self._buffer and not to_disk:
                if self.linger and self._backend_up:
                    self._linger()
                return "stop" if self._stopping else "write"
            wakes = [self._spill_due] if to_disk and self._spill_due is not None else []
            if not due:
                wakes.append(self._retry_at)
            self._condition.wait(max(0.0, min(wakes) - now) if wakes else None)

    def _take_batch(self) -> list[PredictionRecord | LabelRecord]:
        """The oldest ``batch_size`` entries of the buffer, now in flight (holding the lock)."""
        count = min(self.batch_size, len(self._buffer))
        self._in_flight = count
        self._spill_due = None
        return [self._buffer.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            with self._condition:
                step = self._next_step()
                batch = self._take_batch() if step in ("write", "spill") else []
            if step == "stop":
                self._stop()
                return
            if step == "write":
                self._write(batch)
            elif step == "spill":
                self._spill(batch)
            else:
                self._replay()

    def _write(self, batch: list[PredictionRecord | LabelRecord]) -> None:
        predictions = [r for r in batch if isinstance(r, PredictionRecord)]
        labels = [r for r in batch if isinstance(r, LabelRecord)]
        try:
            self.backend.write(predictions, labels)
        except Exception as error:
            self._write_failed(error)
            if self.spill_dir is not None:
                self._spill(batch)
            else:
                with self._condition:
                    self._buffer.extendleft(reversed(batch))  # keep them, in order
                    self._in_flight = 0
            return
        self._written(predictions, labels)
        with self._condition:
            self._in_flight = 0
            self._condition.notify_all()

    def _write_failed(self, error: Exception) -> None:
        with self._condition:
            self._failed_writes += 1
            was_up, self._backend_up = self._backend_up, False
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.retry_max)
            waiting = len(self._buffer) + self._in_flight + self._spilled
        if was_up:
            log.warning("prediction log backend %s failed (%s: %s); %d entries waiting, %s",
                        self.backend.location, type(error).__name__, error, waiting,
                        "spilling to disk" if self.spill_dir is not None else "retrying")
        self._notify("failed_writes", 1)
        self._notify("backend_up", 0)

    def _written(self, predictions: Sequence[PredictionRecord],
                 labels: Sequence[LabelRecord]) -> None:
        """Count a successful backend write; observers hear about it before flush() can
        return (it waits for the entries in flight or spilled)."""
        with self._condition:
            self._logged += len(predictions)
            self._labels_logged += len(labels)
            was_up, self._backend_up = self._backend_up, True
            self._retry_at, self._retry_delay = 0.0, self.retry_initial
            buffered = len(self._buffer)
            spilled = self._spilled
        if not was_up:
            log.warning("prediction log backend %s is back; %d entries in memory, %d spilled",
                        self.backend.location, buffered, spilled)
            self._notify("backend_up", 1)
        if predictions:
            self._notify("logged", len(predictions))
        if labels:
            self._notify("labels_logged", len(labels))
        self._notify("buffered", buffered)
        if self.spill_dir is not None and time.monotonic() - self._last_adopt >= \
                ADOPT_INTERVAL_S:
            self._adopt_orphans()

    def _stop(self) -> None:
        """Spill what is still in memory, then let go of the spill files: what is not
        replayed stays for the next log on the directory."""
        if self.spill_dir is None:
            return  # close() counts what is left as dropped
        while True:
            with self._condition:
                if not self._buffer:
                    break
                batch = self._take_batch()
            self._spill(batch)
        files = [*self._adopted, *([self._own] if self._own is not None else [])]
        self._adopted, self._own = [], None
        left = 0
        for spill in files:
            left += spill.entries
            try:
                spill.close(delete=spill.replayed)
            except OSError as error:
                log.warning("closing spill file %s failed: %s", spill.path, error)
        if left:
            log.warning("prediction log closed with %d entries spilled in %s; the next log on "
                        "that directory replays them", left, self.spill_dir)

    # -- spilling and replaying (writer thread) -------------------------------------------------

    def _open_spill_dir(self) -> None:
        assert self.spill_dir is not None
        try:
            self.spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.spill_dir, 0o700)
            self._adopt_orphans()
        except OSError as error:
            log.error("prediction log spill directory %s is unusable (%s): entries wait in "
                      "memory only while the backend is down", self.spill_dir, error)
            self.spill_dir = None

    def _spill_bytes(self) -> int:
        """Bytes in the spill directory (every worker's files)."""
        assert self.spill_dir is not None
        total = 0
        with os.scandir(self.spill_dir) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # replayed and deleted meanwhile
                    continue
        return total

    def _create_spill_file(self) -> _SpillFile:
        """This log's spill file: created under a temporary name, locked, headed with the
        backend's location and fsync'ed, then renamed to ``<pid>-<random>.jsonl`` (so no other
        log ever sees it unlocked)."""
        assert self.spill_dir is not None
        name = f"{os.getpid()}-{secrets.token_hex(8)}.jsonl"
        path, temp = self.spill_dir / name, self.spill_dir / f".{name}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, self._header)
            os.fsync(fd)
            os.rename(temp, path)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(self.spill_dir)
        size = len(self._header)
        return _SpillFile(path, fd, offset=size, size=size, entries=0, own=True)

    def _spill(self, batch: list[PredictionRecord | LabelRecord]) -> None:
        """Append ``batch`` (in flight) to this log's spill file and fsync it; what does not
        fit under ``spill_max_bytes`` (or cannot be written) is dropped and counted."""
        lines = [_encode_spill_entry(r) for r in batch]
        written, reason = 0, ""
        try:
            room = self.spill_max_bytes - self._spill_bytes()
            fit = size = 0
            for line in lines:
                if size + len(line) > room:
                    reason = f"the spill directory is full ({self.spill_max_bytes} bytes)"
                    break
                size += len(line)
                fit += 1
            if fit:
                if self._own is None:
                    self._own = self._create_spill_file()
                own = self._own
                try:
                    _write_all(own.fd, b"".join(lines[:fit]))
                    os.fsync(own.fd)
                except OSError:
                    try:
                        os.ftruncate(own.fd, own.size)  # no torn entry stays behind
                    except OSError:
                        log.debug("truncating %s failed", own.path, exc_info=True)
                    raise
                own.size += size
                own.entries += fit
                written = fit
        except OSError as error:
            reason = f"spilling to {self.spill_dir} failed: {error}"
        lost = len(batch) - written
        with self._condition:
            self._in_flight = 0
            self._spilled += written
            self._dropped += lost
            if lost:
                self._last_drop = time.monotonic()
            buffered, spilled = len(self._buffer), self._spilled
            self._condition.notify_all()
        if lost:
            if not self._spill_full_logged:
                self._spill_full_logged = True
                log.error("prediction log entries dropped: %s (%d spilled); further drops are "
                          "counted, not logged, until the spill is replayed", reason, spilled)
            self._notify("dropped", lost)
        self._notify("spilled", spilled)
        self._notify("buffered", buffered)

    def _read_chunk(self, spill: _SpillFile
                    ) -> tuple[list[PredictionRecord | LabelRecord], int, int, int]:
        """Up to ``batch_size`` entries from ``spill.offset``: (entries, the offset after
        them, lines read, lines that were not entries). A torn last line (its writer died
        mid-write, before its fsync) counts as one bad line and ends the file."""
        records: list[PredictionRecord | LabelRecord] = []
        position, pending, lines, bad = spill.offset, b"", 0, 0
        while lines < self.batch_size:
            block = os.pread(spill.fd, _READ_BLOCK, position + len(pending))
            if not block:
                if pending:
                    bad += 1
                    position += len(pending)
                break
            pending += block
            start = 0
            while lines < self.batch_size:
                end = pending.find(b"\n", start)
                if end < 0:
                    break
                lines += 1
                try:
                    records.append(_decode_spill_entry(pending[start:end]))
                except (ValueError, TypeError, KeyError, AttributeError):
                    bad += 1
                start = end + 1
            position += start
            pending = pending[start:]
        return records, position, lines, bad

    def _replay(self) -> None:
        """Write the next spilled chunk (the oldest spill file first); this is also how the
        writer probes a backend that was down."""
        spill = self._adopted[0] if self._adopted else self._own
        assert spill is not None
        try:
            records, offset, lines, bad = self._read_chunk(spill)
        except OSError as error:
            log.error("reading spill file %s failed (%s): its %d entries are dropped",
                      spill.path, error, spill.entries)
            self._finish(spill, dropped=spill.entries, delete=False)
            return
        if offset == spill.offset:  # nothing left to read: the file was cut short under us
            log.error("spill file %s ends before its %d entries; they are dropped", spill.path,
                      spill.entries)
            self._finish(spill, dropped=spill.entries)
            return
        predictions = [r for r in records if isinstance(r, PredictionRecord)]
        labels = [r for r in records if isinstance(r, LabelRecord)]
        if records:
            try:
                self.backend.write(predictions, labels)
            except Exception as error:
                self._write_failed(error)
                return
        spill.offset = offset
        spill.entries -= lines
        if spill.replayed:
            self._finish(spill)
        if records:
            self._written(predictions, labels)
        if bad:
            log.warning("spill file %s: %d unreadable entries skipped", spill.path, bad)
            self._notify("dropped", bad)
        # Only this thread changes the count: observers hear it before flush() can return.
        with self._condition:
            spilled = self._spilled - lines
        self._notify("spilled", spilled)
        with self._condition:
            self._spilled -= lines
            if bad:
                self._dropped += bad
                self._last_drop = time.monotonic()
            self._condition.notify_all()

    def _finish(self, spill: _SpillFile, *, dropped: int = 0, delete: bool = True) -> None:
        """Let go of a replayed spill file (deleted only now that every entry is stored)."""
        if spill.own:
            self._own = None
        else:
            self._adopted.remove(spill)
        with self._condition:
            self._spilled -= spill.entries
            self._dropped += dropped
            if dropped:
                self._last_drop = time.monotonic()
            spilled = self._spilled
            self._condition.notify_all()
        spill.entries = 0
        try:
            spill.close(delete=delete)
        except OSError as error:
            log.warning("removing spill file %s failed: %s", spill.path, error)
        if dropped:
            self._notify("dropped", dropped)
            self._notify("spilled", spilled)
        if not self._has_spill():
            self._spill_full_logged = False
            log.info("prediction log spill replayed to %s", self.backend.location)

    def _adopt_orphans(self) -> None:
        """Take over the spill files in the directory whose lock is free (their writer is
        gone) and whose header names this log's backend; they are replayed before memory."""
        assert self.spill_dir is not None
        self._last_adopt = time.monotonic()
        held = {f.path.name for f in self._adopted}
        if self._own is not None:
            held.add(self._own.path.name)
        adopted: list[_SpillFile] = []
        try:
            with os.scandir(self.spill_dir) as entries:
                names = sorted(entry.name for entry in entries)
            for name in names:
                path = self.spill_dir / name
                if SPILL_TEMP_PATTERN.fullmatch(name):
                    self._remove_abandoned(path)
                elif (SPILL_FILE_PATTERN.fullmatch(name) and name not in held
                      and name not in self._foreign):
                    spill = self._try_adopt(path)
                    if spill is not None:
                        adopted.append(spill)
        except OSError as error:
            log.warning("looking for orphaned spill files in %s failed: %s", self.spill_dir,
                        error)
        if not adopted:
            return
        self._adopted.extend(adopted)
        count = sum(spill.entries for spill in adopted)
        with self._condition:
            self._spilled += count
            spilled = self._spilled
            self._condition.notify_all()
        log.warning("prediction log adopted %d orphaned spill file(s) with %d entries (%s); "
                    "replaying them", len(adopted), count,
                    ", ".join(spill.path.name for spill in adopted))
        self._notify("spilled", spilled)

    def _try_adopt(self, path: Path) -> _SpillFile | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            os.close(fd)
            return None
        try:
            status = os.fstat(fd)
            try:
                named = os.stat(path)
            except FileNotFoundError:
                named = None
            if named is None or (named.st_dev, named.st_ino) != (status.st_dev, status.st_ino):
                os.close(fd)  # replayed and deleted by its writer after we opened it
                return None
            head = os.pread(fd, 64 * 1024, 0)
            end = head.find(b"\n")
            header = json.loads(head[:end]) if end > 0 else {}
            if header.get("backend") != self.backend.location:
                self._foreign.add(path.name)
                log.info("spill file %s is not for %s (%s); left for its own backend",
                         path.name, self.backend.location, header.get("backend"))
                os.close(fd)
                return None
            entries, position = 0, end + 1
            while block := os.pread(fd, _READ_BLOCK, position):
                entries += block.count(b"\n")
                position += len(block)
        except (OSError, ValueError, AttributeError) as error:
            self._foreign.add(path.name)
            log.warning("spill file %s cannot be adopted: %s", path, error)
            os.close(fd)
            return None
        return _SpillFile(path, fd, offset=end + 1, size=status.st_size, entries=entries,
                          own=False)

    @staticmethod
    def _remove_abandoned(path: Path) -> None:
        """Delete a spill file its creator never finished (it died between creating and
        renaming it); recent ones may still be in the making."""
        try:
            if time.time() - path.stat().st_mtime < _ABANDONED_TEMP_S:
                return
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


# --- choosing a backend and reading ----------------------------------------------------------


def log_redis_url(settings: Settings, log_settings: PredictionLogSettings | None = None
                  ) -> str | None:
    """The Redis URL of the log (its own setting, else the platform's), or None for SQLite."""
    log_settings = log_settings or settings.prediction_log
    return log_settings.redis_url or settings.redis_url


def open_backend(pipeline: str, settings: Settings,
                 log_settings: PredictionLogSettings | None = None) -> LogBackend:
    """The backend the settings choose for ``pipeline``: Redis Streams or the SQLite file."""
    log_settings = log_settings or settings.prediction_log
    url = log_redis_url(settings, log_settings)
    if url:
        return RedisLogBackend(url, pipeline, maxlen=log_settings.stream_maxlen,
                               label_window_s=log_settings.label_window_days * 86_400)
    return SqliteLogBackend(sqlite_log_path(settings.data_root, pipeline))


def open_log(pipeline: str, settings: Settings, *,
             log_settings: PredictionLogSettings | None = None,
             observer: Observer | None = None) -> PredictionLog:
    """A :class:`PredictionLog` writing to the backend the settings choose, spilling to
    ``<data_root>/prediction-log/spill/<pipeline>/`` while it is down (unless
    ``spill_max_bytes`` is 0)."""
    log_settings = log_settings or settings.prediction_log
    spill_dir = spill_dir_path(settings.data_root, pipeline) \
        if log_settings.spill_max_bytes else None
    return PredictionLog(open_backend(pipeline, settings, log_settings),
                         buffer_size=log_settings.buffer_size,
                         batch_size=log_settings.batch_size,
                         linger=log_settings.linger_ms / 1000.0, observer=observer,
                         spill_dir=spill_dir, spill_max_bytes=log_settings.spill_max_bytes)


def _epoch_us(moment: dt.datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("window bounds must be timezone-aware datetimes")
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


def _finish_predictions(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    if not rows:
        frame = _empty_frame(PREDICTION_COLUMNS)
        frame["ts"] = pd.Series(dtype="datetime64[us, UTC]")
        return frame
    frame = pd.DataFrame.from_records(rows, columns=list(PREDICTION_COLUMNS))
    frame = frame.drop_duplicates(["request_id", "position"], keep="first")
    frame = frame.sort_values(["ts", "request_id", "position"], kind="stable")
    frame["inputs"] = frame["inputs"].map(json.loads)
    frame["features"] = frame["features"].map(json.loads)
    frame["ts"] = pd.to_datetime(frame["ts"].astype("int64"), unit="us", utc=True)
    frame["position"] = frame["position"].astype("int64")
    frame["prediction"] = frame["prediction"].astype("float64")
    frame["probability"] = pd.to_numeric(frame["probability"], errors="coerce")
    return frame.reset_index(drop=True)


def _finish_labels(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    if not rows:
        frame = _empty_frame(LABEL_COLUMNS)
        frame["ts"] = pd.Series(dtype="datetime64[us, UTC]")
        return frame
    frame = pd.DataFrame.from_records(rows, columns=list(LABEL_COLUMNS))
    frame = frame.sort_values("ts", kind="stable")
    frame = frame.drop_duplicates(["request_id", "entity_id"], keep="last")
    frame["label"] = frame["label"].astype("float64")
    frame["ts"] = pd.to_datetime(frame["ts"].astype("int64"), unit="us", utc=True)
    return frame.reset_index(drop=True)


def _read_sqlite(path: Path, table: str, columns: Sequence[str], start_us: int, end_us: int
                 ) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        # table and columns are module constants; the bounds are parameters.
        query = (f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608
                 " WHERE ts >= ? AND ts < ? ORDER BY ts")
        try:
            cursor = db.execute(query, (start_us, end_us))
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise
        return [dict(zip(columns, row, strict=True)) for row in cursor]
    finally:
        db.close()


def _read_stream(client: Any, key: str, columns: Sequence[str], start_us: int, end_us: int,
                 page: int = 10_000) -> list[dict[str, Any]]:
    """Entries of ``key`` whose ``ts`` is in the window. Entries are appended when written,
    which can be long after their ``ts`` (a backend outage), so the scan runs from the window
    start (less the clock-skew margin) to the end of the stream."""
    cursor = f"{max(0, (start_us - CLOCK_SKEW_US) // 1000)}-0"
    rows: list[dict[str, Any]] = []
    while True:
        entries = client.xrange(key, min=cursor, max="+", count=page)
        for _entry_id, fields in entries:
            ts = int(fields[b"ts"])
            if start_us <= ts < end_us:
                rows.append({c: fields.get(c.encode(), b"").decode("utf-8") for c in columns})
                rows[-1]["ts"] = ts
        if len(entries) < page:
            return rows
        cursor = "(" + entries[-1][0].decode()


def _window(pipeline: str, start: dt.datetime, end: dt.datetime) -> tuple[int, int]:
    check_pipeline(pipeline)
    start_us, end_us = _epoch_us(start), _epoch_us(end)
    if end_us < start_us:
        raise ValueError(f"window end {end} is before its start {start}")
    return start_us, end_us


def read_predictions(pipeline: str, start: dt.datetime, end: dt.datetime, *,
                     settings: Settings | None = None,
                     log_settings: PredictionLogSettings | None = None) -> pd.DataFrame:
    """Predictions with ``start <= ts < end`` as a DataFrame (columns ``PREDICTION_COLUMNS``).

    ``ts`` is a UTC timestamp; ``inputs`` and ``features`` are dicts; ``probability`` is NaN
    for regression. Rows are in time order, each (request_id, position) once.
    """
    from airmlops.settings import get_settings

    settings = settings or get_settings()
    start_us, end_us = _window(pipeline, start, end)
    url = log_redis_url(settings, log_settings)
    if url:
        client = _redis_client(url, timeout=10.0)
        try:
            rows = _read_stream(client, stream_keys(pipeline)[0], PREDICTION_COLUMNS,
                                start_us, end_us)
        finally:
            client.close()
        for row in rows:
            row["position"] = int(row["position"])
            row["prediction"] = float(row["prediction"])
            row["probability"] = float(row["probability"]) if row["probability"] else None
    else:
        rows = _read_sqlite(sqlite_log_path(settings.data_root, pipeline), "predictions",
                            PREDICTION_COLUMNS, start_us, end_us)
    return _finish_predictions(rows)


def read_labels(pipeline: str, start: dt.datetime, end: dt.datetime, *,
                settings: Settings | None = None,
                log_settings: PredictionLogSettings | None = None) -> pd.DataFrame:
    """Labels received with ``start <= ts < end`` (columns ``LABEL_COLUMNS``), the latest per
    (request_id, entity_id)."""
    from airmlops.settings import get_settings

    settings = settings or get_settings()
    start_us, end_us = _window(pipeline, start, end)
    url = log_redis_url(settings, log_settings)
    if url:
        client = _redis_client(url, timeout=10.0)
        try:
            rows = _read_stream(client, stream_keys(pipeline)[1], LABEL_COLUMNS, start_us,
                                end_us)
        finally:
            client.close()
        for row in rows:
            row["label"] = float(row["label"])
    else:
        rows = _read_sqlite(sqlite_log_path(settings.data_root, pipeline), "labels",
                            LABEL_COLUMNS, start_us, end_us)
    return _finish_labels(rows)
