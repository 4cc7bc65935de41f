"""The prediction log in Redis Streams (used when a Redis URL is configured).

The streams ``<pipeline>:predictions`` and ``<pipeline>:labels`` hold one entry per row with
the same fields as the SQLite tables, appended with ``XADD ... MAXLEN ~ <bound>`` by one Lua
script call per batch (atomic). The script keeps the hash ``<pipeline>:appended:<request_id>``
of what it appended for a request (``p<position>``, and ``l<entity>`` -> ``<ts> <label>`` for
labels written through the log) and skips a row already there, so a batch written twice is
appended once (readers also drop duplicate ``(request_id, position)`` entries). The same call
adds each row's entity to the set ``<pipeline>:request:<request_id>``: the record that the
request was issued, which labels are checked against (it holds entity ids only). Both expire
after ``label_window_days``. The sorted set ``<pipeline>:issued`` orders those records by
time, and the script drops the oldest (with their labels' hash and their appended hash) beyond
``stream_maxlen`` requests, so the records are bounded like the streams, whatever the traffic.

A ``/feedback`` claim is one Lua script, which keeps the labels given so far in the hash
``<pipeline>:labeled:<request_id>``; Redis runs it atomically, whichever worker calls it.

Shadow rows (:mod:`airmlops.serving.prediction_log.shadow`) live in their own namespace,
``<pipeline>:shadow:``: the stream ``<pipeline>:shadow:predictions`` (same fields, ``MAXLEN ~``
the same bound), the hash ``<pipeline>:shadow:appended:<request_id>`` that stores each
``(request_id, position)`` once, and the sorted set ``<pipeline>:shadow:issued`` that bounds
those hashes like ``<pipeline>:issued`` bounds the live ones. No request record is written for
them, so a ``/feedback`` claim never finds a shadow row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from airmlops.serving.prediction_log.backend import LabelClaim
from airmlops.serving.prediction_log.records import (
    LabelRecord,
    PredictionRecord,
    check_pipeline,
    check_request_id,
    clean_row,
    to_json,
)

CLOCK_SKEW_US = 300 * 1_000_000
"""How much earlier than a prediction's own ``ts`` a Redis stream id may be (clock skew
between the service and the Redis server); the window read starts this much early."""


def stream_keys(pipeline: str) -> tuple[str, str]:
    """The (predictions, labels) stream keys of a pipeline."""
    check_pipeline(pipeline)
    return f"{pipeline}:predictions", f"{pipeline}:labels"


def request_key(pipeline: str, request_id: str) -> str:
    """The set of entities request ``request_id`` predicted (Redis)."""
    return f"{check_pipeline(pipeline)}:request:{check_request_id(request_id)}"


def issued_key(pipeline: str) -> str:
    """The sorted set of issued request ids by time, which bounds their records (Redis)."""
    return f"{check_pipeline(pipeline)}:issued"


def labeled_key(pipeline: str, request_id: str) -> str:
    """The hash entity -> label of the labels request ``request_id`` got so far (Redis)."""
    return f"{check_pipeline(pipeline)}:labeled:{check_request_id(request_id)}"


def appended_key(pipeline: str, request_id: str) -> str:
    """The hash of the rows of request ``request_id`` the log has appended (Redis): field
    ``p<position>`` per prediction, ``l<entity>`` -> ``<ts> <label>`` per logged label."""
    return f"{check_pipeline(pipeline)}:appended:{check_request_id(request_id)}"


def shadow_stream_key(pipeline: str) -> str:
    """The stream of a pipeline's shadow predictions (Redis)."""
    return f"{check_pipeline(pipeline)}:shadow:predictions"


def shadow_appended_key(pipeline: str, request_id: str) -> str:
    """The hash of the shadow rows of live request ``request_id`` appended so far (Redis)."""
    return f"{check_pipeline(pipeline)}:shadow:appended:{check_request_id(request_id)}"


def redis_client(url: str, *, timeout: float) -> Any:
    """A client of ``url`` (bytes replies) with ``timeout`` for connecting and each call."""
    import redis

    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError("the Redis URL must start with redis://, rediss:// or unix://")
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                decode_responses=False)


def _redis_location(url: str) -> str:
    """``url`` without its credentials and query."""
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


_SHADOW_SCRIPT = """
-- KEYS: the shadow stream, the shadow issued sorted set, then each row's shadow appended key
-- ARGV: maxlen, ttl (s), the shadow key prefix, then 9 field/value pairs per row
local maxlen, ttl = ARGV[1], ARGV[2]
local at = 4
for row = 1, #KEYS - 2 do
  local appended = KEYS[2 + row]
  if redis.call('HSETNX', appended, 'p' .. ARGV[at + 3], '1') == 1 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, at, at + 17))
    redis.call('EXPIRE', appended, ttl)
    redis.call('ZADD', KEYS[2], 'NX', ARGV[at + 5], ARGV[at + 1])
  end
  at = at + 18
end
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(maxlen)
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #oldest, 2 do redis.call('DEL', ARGV[3] .. 'appended:' .. oldest[i]) end
end
return at
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
        self._client = client or redis_client(url, timeout=timeout)
        self._append = self._client.register_script(_APPEND_SCRIPT)
        self._claim = self._client.register_script(_CLAIM_SCRIPT)
        self._append_shadow = self._client.register_script(_SHADOW_SCRIPT)

    @property
    def location(self) -> str:
        """The server and the two stream keys (no password)."""
        return f"{_redis_location(self.url)} streams {self.predictions_key}, {self.labels_key}"

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None:
        """XADD the batch in one script call: all of it is appended or none, and rows
        appended before (a retried or replayed batch) are not appended again."""
        if not predictions and not labels:
            return
        args: list[Any] = [self.maxlen, len(predictions), len(labels), self.label_window_s,
                           f"{self.pipeline}:", *_prediction_fields(predictions)]
        for r in labels:
            args += ("request_id", r.request_id, "entity_id", r.entity_id,
                     "label", repr(float(r.label)), "ts", r.ts_us)
        keys = [self.predictions_key, self.labels_key, issued_key(self.pipeline)]
        for r in predictions:
            keys += (request_key(self.pipeline, r.request_id),
                     appended_key(self.pipeline, r.request_id))
        keys += (appended_key(self.pipeline, r.request_id) for r in labels)
        self._append(keys=keys, args=args)

    def write_shadow(self, predictions: Sequence[PredictionRecord]) -> None:
        """XADD shadow rows to the shadow stream in one script call; a ``(request_id,
        position)`` appended before is not appended again."""
        if not predictions:
            return
        keys = [shadow_stream_key(self.pipeline), f"{self.pipeline}:shadow:issued",
                *(shadow_appended_key(self.pipeline, r.request_id) for r in predictions)]
        args = [self.maxlen, self.label_window_s, f"{self.pipeline}:shadow:",
                *_prediction_fields(predictions)]
        self._append_shadow(keys=keys, args=args)

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

    def ping(self) -> None:
        """PING the server; raises when it cannot be reached."""
        self._client.ping()

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()


def _prediction_fields(predictions: Sequence[PredictionRecord]) -> list[Any]:
    """The 9 field/value pairs of each prediction's stream entry, one row after another."""
    fields: list[Any] = []
    for r in predictions:
        fields += (
            "request_id", r.request_id, "position", r.position, "ts", r.ts_us,
            "model_version", r.model_version, "entity_id", r.entity_id,
            "inputs", to_json(clean_row(r.inputs)),
            "features", to_json(clean_row(r.features)),
            "prediction", repr(float(r.prediction)),
            "probability", "" if r.probability is None else repr(float(r.probability)),
        )
    return fields


def read_stream_rows(client: Any, key: str, columns: Sequence[str], start_us: int,
                     end_us: int, page: int = 10_000) -> list[dict[str, Any]]:
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


def read_redis_rows(url: str, key: str, columns: Sequence[str], start_us: int,
                    end_us: int) -> list[dict[str, Any]]:
    """:func:`read_stream_rows` of ``key`` on the server at ``url`` (a client of its own)."""
    client = redis_client(url, timeout=10.0)
    try:
        return read_stream_rows(client, key, columns, start_us, end_us)
    finally:
        client.close()
