"""The online store: the newest feature row per (view, entity), served in one round trip.

One small interface, :class:`OnlineStore`, two backends:

- :class:`SqliteOnlineStore` (the embedded default): one WAL-mode table keyed
  (namespace, view, entity) with the row's ``event_ts``, an expiry time and a JSON payload.
- :class:`RedisOnlineStore` (when ``MLOPS_REDIS_URL`` is set): one hash per view per entity at
  ``airmlops:<namespace>:<view>:<entity>`` whose fields are the feature names plus ``__ts``
  (the row's event time, epoch microseconds), expiring ``ttl`` seconds after the write.
  Writes go through a Lua script, so "write only when newer than the stored ``__ts``" is atomic.
  Redis Cluster is not supported (a batched write touches many keys in one script).

:func:`make_online_store` picks the backend from the settings. The interface and what the
backends share live in :mod:`~airmlops.features.online_base`, the SQLite backend in
:mod:`~airmlops.features.online_sqlite`, the Redis backend here; every name is importable
from this module.

Semantics shared by both backends (one test body runs on both):

- ``write(view, rows)`` takes a DataFrame or a list of dicts with the view's join key,
  ``event_timestamp`` and the features; it is batched (``executemany``, pipelined Lua calls) and
  returns how many rows were stored. A row replaces the stored one only when its event time is
  strictly newer (or the stored one has expired): out-of-order and repeated writes are safe.
  The key expires ``ttl_seconds`` (default: the view's ``ttl_days``) after the write.
- ``read(views, entity_ids, as_of=None)`` costs exactly one round trip for all views and all
  entities (``round_trips`` counts them). It returns an :class:`OnlineResult`: values for every
  requested entity and feature (``None`` where missing) and ``missing``, the entities found in
  no view: an unknown entity is a result, not an exception. With ``as_of`` (the request time), a
  row whose event time is not newer than ``as_of - ttl`` is treated as missing, exactly the
  offline store's point-in-time rule.
- Values come back typed: ``bool``, ``int``, ``float``, ``str`` or ``None``. NaN is stored as
  missing; numpy scalars become Python values; anything else is stored as its ``str``.
  Redis encoding of a field: one type tag then the text, ``b1``/``b0``, ``i<int>``,
  ``f<repr(float)>`` (exact round trip), ``s<utf-8 text>``; a missing value has no field.
- Entity ids are keyed by ``str(entity_id)`` (so ``7`` and ``"7"`` are the same entity).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.features.definitions import FeatureView
from airmlops.features.online_base import (
    OnlineResult,
    OnlineStore,
    assemble,
    check_namespace,
    python_value,
    rows_columns,
    unique_entities,
)
from airmlops.features.online_sqlite import SqliteOnlineStore

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.settings import Settings

__all__ = [
    "TS_FIELD", "OnlineResult", "OnlineStore", "RedisOnlineStore", "SqliteOnlineStore",
    "decode_value", "encode_value", "make_online_store", "python_value",
]

log = logging.getLogger(__name__)

TS_FIELD = "__ts"
"""The Redis hash field holding the row's event time (epoch microseconds)."""


# --- Redis ---------------------------------------------------------------------------------

_WRITE_NEWER = """
-- KEYS: one hash per row. ARGV[1]: ttl seconds; ARGV[2]: JSON list of the field names;
-- ARGV[3]: JSON list of rows, each [event time (epoch us, as text), encoded values...]
-- where '' means missing (no field). Times stay text: Lua numbers would round them on HSET.
local ttl = tonumber(ARGV[1])
local names = cjson.decode(ARGV[2])
local rows = cjson.decode(ARGV[3])
local written = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local row = rows[i]
  local ts = row[1]
  local current = redis.call('HGET', key, '__ts')
  if (not current) or tonumber(current) < tonumber(ts) then
    if current then redis.call('DEL', key) end
    local args = {'__ts', ts}
    for j = 1, #names do
      local value = row[j + 1]
      if value ~= '' then
        args[#args + 1] = names[j]
        args[#args + 1] = value
      end
    end
    redis.call('HSET', key, unpack(args))
    redis.call('EXPIRE', key, ttl)
    written = written + 1
  end
end
return written
"""

_WRITE_BATCH_ROWS = 500


def encode_value(value: Any) -> str:
    """The Redis text of a stored value ('' for missing); see the module docstring."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "b1" if value else "b0"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, float):
        return f"f{value!r}"
    return f"s{value}"


def _encode_column(values: list[Any]) -> list[str]:
    """:func:`encode_value` of every value; one comprehension for an all-float or all-int
    column (with missing values), the common cases."""
    kinds = set(map(type, values))
    kinds.discard(type(None))
    if kinds <= {float}:
        return [f"f{value!r}" if value is not None else "" for value in values]
    if kinds <= {int}:
        return [f"i{value}" if value is not None else "" for value in values]
    return [encode_value(value) for value in values]


def decode_value(raw: bytes | None) -> Any:
    """The Python value of a Redis field written by :func:`encode_value`."""
    if raw is None:
        return None
    tag = raw[:1]
    if tag == b"f":
        return float(raw[1:])
    if tag == b"i":
        return int(raw[1:])
    if tag == b"s":
        return raw[1:].decode("utf-8")
    if tag == b"b":
        return raw[1:] == b"1"
    raise ValueError(f"unknown online value encoding {raw[:8]!r}")


def _hiredis_marker() -> Any:
    """The "not enough data" marker redis-py gives its hiredis reader, or None (then replies
    are read with ``read_response``)."""
    try:
        from redis._parsers.hiredis import NOT_ENOUGH_DATA
    except ImportError:  # pragma: no cover (another redis-py layout)
        return None
    return NOT_ENOUGH_DATA


def _hiredis_available() -> bool:
    """Whether redis-py parses replies with hiredis (its C parser) rather than in Python."""
    from redis.utils import HIREDIS_AVAILABLE

    return bool(HIREDIS_AVAILABLE)


class RedisOnlineStore:
    """The Redis online store (see the module docstring for the layout and the encoding)."""

    def __init__(self, url: str, namespace: str = "default", *, client: Any = None) -> None:
        import redis

        if not re.match(r"^(redis|rediss|unix)://", url):
            raise ValueError("the Redis URL must start with redis://, rediss:// or unix://")
        self.url = url
        self.namespace = check_namespace(namespace)
        self.prefix = f"airmlops:{self.namespace}"
        self.round_trips = 0
        self._client = client or redis.Redis.from_url(url, decode_responses=False)
        if not _hiredis_available():
            log.warning("hiredis is not installed: Redis replies are parsed in Python, online "
                        "reads of many entities take about twice as long (pip install hiredis)")
        self._write_script = self._client.register_script(_WRITE_NEWER)
        self._script_loaded = False
        self._plans: dict[int, tuple[FeatureView, tuple[str, list[str], bytes, bytes, bytes]]] = {}
        self._idle: list[Any] = []
        self._pid = os.getpid()

    @property
    def location(self) -> str:
        """The server's URL without credentials or query."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"

    def key(self, view: FeatureView | str, entity_id: Any) -> str:
        """The hash key of one entity's row of one view."""
        name = view if isinstance(view, str) else view.name
        return f"{self.prefix}:{name}:{entity_id}"

    def write(
        self,
        view: FeatureView,
        rows: pd.DataFrame | Sequence[Mapping[str, Any]],
        *,
        ttl_seconds: int | None = None,
    ) -> int:
        """Write ``rows`` (only newer ones take effect), pipelined in Lua batches."""
        entities, stamps, columns = rows_columns(view, rows)
        if not entities:
            return 0
        ttl = int(ttl_seconds if ttl_seconds is not None else view.ttl_seconds)
        if ttl < 1:
            raise ValueError("ttl_seconds must be at least 1")
        import redis

        names = json.dumps(view.feature_names)
        prefix = f"{self.prefix}:{view.name}:"

        def batches() -> Iterator[tuple[list[str], str]]:
            # Encoded batch by batch, so that Redis runs one batch while the next is encoded.
            for start in range(0, len(entities), _WRITE_BATCH_ROWS):
                stop = start + _WRITE_BATCH_ROWS
                keys = [prefix + entity for entity in entities[start:stop]]
                encoded = [_encode_column(column[start:stop]) for column in columns]
                rows_text = [str(stamp) for stamp in stamps[start:stop]]
                yield keys, json.dumps(list(zip(rows_text, *encoded, strict=True)))

        if not self._script_loaded:
            self._client.script_load(_WRITE_NEWER)
            self._script_loaded = True
        try:
            written = self._stream_script(batches(), ttl, names)
        except redis.exceptions.NoScriptError:  # the server lost its script cache (a restart)
            self._client.script_load(_WRITE_NEWER)
            written = self._stream_script(batches(), ttl, names)
        self.round_trips += 1
        return written

    def _stream_script(self, batches: Iterator[tuple[list[str], str]], ttl: int,
                       names: str) -> int:
        """EVALSHA the write script once per batch, each sent as soon as it is encoded, then
        read every reply: one round trip, with the client and Redis working at the same time.

        Every reply is read even after an error reply, so the connection stays in step; a
        connection that fails mid-way is dropped. The first error is raised after that.
        """
        import redis

        sha = self._write_script.sha
        pool = self._client.connection_pool
        connection = pool.get_connection()
        try:
            sent = 0
            for keys, rows_json in batches:
                connection.send_packed_command(
                    connection.pack_command("EVALSHA", sha, len(keys), *keys, ttl, names,
                                            rows_json), check_health=sent == 0)
                sent += 1
            written, error = 0, None
            for _ in range(sent):
                try:
                    written += int(connection.read_response())
                except redis.ResponseError as exc:
                    error = error or exc
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if error is not None:
            raise error
        return written

    def read(
        self,
        views: Sequence[FeatureView],
        entity_ids: Iterable[Any],
        *,
        as_of: dt.datetime | None = None,
    ) -> OnlineResult:
        """HMGET every (view, entity) in one pipeline: exactly one round trip."""
        entity_ids = unique_entities(entity_ids)
        keys = [str(e).encode() for e in entity_ids]
        plans = [self._view_plan(view) for view in views]
        found: dict[tuple[str, str], tuple[int, list[Any]]] = {}
        if keys and views:
            packed = [
                b"%s$%d\r\n%s%s\r\n%s" % (head, len(prefix) + len(key), prefix, key, tail)
                for _, _, head, prefix, tail in plans
                for key in keys
            ]
            # Replies are decoded as they arrive: Redis sends them in chunks while it works
            # through the rest of the batch.
            replies = self._replies(b"".join(packed), len(packed))
            for view_name, names, *_ in plans:
                width = len(names)
                for key in keys:
                    reply = next(replies)
                    stamp = reply[width]
                    if stamp is not None:
                        # Floats (tag b"f" = 102) and ints (b"i" = 105) decoded inline.
                        found[(view_name, key.decode())] = (int(stamp), [
                            float(raw[1:]) if raw is not None and raw[0] == 102
                            else int(raw[1:]) if raw is not None and raw[0] == 105
                            else decode_value(raw)
                            for raw in reply[:width]
                        ])
            next(replies, None)  # lets the exchange finish: the connection goes back idle
        return assemble(views, entity_ids, found, as_of, [plan[1] for plan in plans])

    def _view_plan(self, view: FeatureView) -> tuple[str, list[str], bytes, bytes, bytes]:
        """(name, feature names, and the RESP pieces of ``HMGET <key> <fields...>``: the
        command header, the key prefix, the packed field list) of a view, cached per view
        object (views are immutable); the key itself is added per entity."""
        cached = self._plans.get(id(view))
        if cached is not None and cached[0] is view:
            return cached[1]
        names = view.feature_names
        fields = [n.encode() for n in (*names, TS_FIELD)]
        head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)
        tail = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)
        plan = (view.name, names, head, f"{self.prefix}:{view.name}:".encode(), tail)
        if len(self._plans) >= 256:
            self._plans.clear()
        self._plans[id(view)] = (view, plan)
        return plan

    def _connection(self) -> Any:
        """An idle connection of this store's own (a new one if none is idle).

        Reads keep their connections here rather than in redis-py's pool: taking one from the
        pool costs a lock, a readiness poll of the socket and metrics bookkeeping, a fifth of a
        single-entity read. Connections made before a fork are left to the parent."""
        if self._pid != os.getpid():
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            pool = self._client.connection_pool
            return pool.connection_class(**pool.connection_kwargs)

    def _replies(self, packed: bytes, count: int) -> Iterator[Any]:
        """Send ``count`` packed commands at once and yield their replies as they arrive: one
        round trip.

        The same as a redis-py pipeline without transaction, minus its per-command bookkeeping.
        With hiredis, replies are taken straight from its reader (filled from the socket by
        redis-py's parser): ``connection.read_response()`` costs ~3 us per reply, most of a
        100-entity read's client time. An error reply is raised once every reply is read; a
        connection that fails or is abandoned mid-way is dropped, never reused; a broken idle
        connection (nothing received yet) is retried once on a fresh one.
        """
        import redis

        not_enough_data = _hiredis_marker()
        for attempt in (1, 2):
            connection = self._connection()
            parser = getattr(connection, "_parser", None)
            done, error, clean = 0, None, False
            try:
                connection.send_packed_command([packed])
                reader = getattr(parser, "_reader", None)
                if not_enough_data is None or reader is None:
                    def gets(connection: Any = connection) -> Any:
                        try:
                            return connection.read_response()
                        except redis.ResponseError as exc:
                            return exc
                    fill = None
                else:
                    gets, fill = reader.gets, parser.read_from_socket
                while done < count:
                    reply = gets()
                    if reply is not_enough_data and fill is not None:
                        fill()
                        continue
                    if isinstance(reply, redis.ConnectionError):
                        raise reply
                    done += 1
                    if isinstance(reply, Exception):
                        error = error or reply
                    elif error is None:
                        yield reply
                clean = True
            except (redis.ConnectionError, redis.TimeoutError):
                if attempt == 2 or done:
                    raise
                continue
            finally:
                if clean:
                    self._idle.append(connection)
                else:
                    connection.disconnect()
            self.round_trips += 1
            if error is not None:
                raise error
            return

    def close(self) -> None:
        """Disconnect the idle read connections and the client's pool."""
        while self._idle:
            self._idle.pop().disconnect()
        self._client.close()

    def __enter__(self) -> RedisOnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_online_store(settings: Settings, namespace: str) -> OnlineStore:
    """Redis when ``settings.redis_url`` is set, else SQLite at ``<data_root>/online/store.sqlite``.

    ``namespace`` is the pipeline name: pipelines never see each other's rows.
    """
    if settings.redis_url:
        return RedisOnlineStore(settings.redis_url, namespace)
    return SqliteOnlineStore(Path(settings.data_root) / "online" / "store.sqlite", namespace)
