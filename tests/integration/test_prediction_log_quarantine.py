"""A poison entry (one the backend refuses while it answers) is quarantined, not retried forever.

Each test runs the real writer on a real backend: a private redis-server whose
``proto-max-bulk-len`` is lowered to its minimum (1 MiB), so an entry bigger than that is refused
while PING still answers; and the SQLite file and that Redis server with an entity id that
neither can encode (a lone surrogate). The refused entry lands in
``<spill dir>/quarantine/<spill file name>`` with the error, ``quarantined`` counts it, the
entries around it are stored in order and ``flush()`` returns. A backend that is down (the
server stopped) is not quarantined: its entries wait and are replayed when it returns. A
quarantine file moved back into the spill directory under a new spill file name, once the
cause is fixed, is adopted and stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from airmlops.serving.prediction_log import (
    LogBackend,
    PredictionLog,
    PredictionRecord,
    RedisLogBackend,
    SqliteLogBackend,
)
from airmlops.serving.prediction_log.spill import QUARANTINE_DIR, decode_entry
from airmlops.serving.prediction_log.writer import ISOLATE_AFTER

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis_fixture

pytestmark = pytest.mark.integration

PIPELINE = "churn"
T0_US = 1_772_366_400_000_000  # 2026-03-01 12:00 UTC
BULK_LIMIT = 1 << 20  # the smallest proto-max-bulk-len Redis takes


def request_id(i: int) -> str:
    return f"{i:032x}"


def prediction(i: int, *, blob: str = "", entity: str | None = None) -> PredictionRecord:
    entity = entity if entity is not None else f"C{i}"
    inputs = {"customer_id": entity, "tenure_days": 12.5}
    if blob:
        inputs["notes"] = blob
    return PredictionRecord(
        request_id=request_id(i), position=0, ts_us=T0_US + i * 1000, model_version="3",
        entity_id=entity, inputs=inputs, features={"tenure_days": 12.5}, prediction=1.0,
        probability=0.75)


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


class PrivateRedis(redis_fixture.PrivateRedis):
    """The module's private redis-server, with a client and the prediction stream read raw."""

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stored(self) -> list[str]:
        """The request ids of the prediction stream, in the order appended."""
        with contextlib.closing(self.client()) as client:
            return [f[b"request_id"].decode() for _, f in
                    client.xrange(f"{PIPELINE}:predictions")]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def open_log(backend: LogBackend, spill_dir: Path, events: list | None = None) -> PredictionLog:
    return PredictionLog(backend, batch_size=10, retry_initial=0.05, retry_max=0.2,
                         spill_dir=spill_dir, observer=None if events is None else
                         lambda event, amount: events.append((event, amount)))


def quarantine_lines(spill_dir: Path) -> tuple[list[Path], list[dict], list[bytes]]:
    """The quarantine files, their headers and their entry lines."""
    files = sorted((spill_dir / QUARANTINE_DIR).glob("*.jsonl"))
    headers, lines = [], []
    for path in files:
        header, *entries = path.read_bytes().splitlines()
        headers.append(json.loads(header))
        lines += entries
    return files, headers, lines


def test_an_entry_bigger_than_redis_takes_is_quarantined_and_the_rest_stored_in_order(
        private_redis: PrivateRedis, tmp_path: Path, caplog) -> None:
    with contextlib.closing(private_redis.client()) as client:
        client.config_set("proto-max-bulk-len", str(BULK_LIMIT))
    spill_dir = tmp_path / "spill"
    events: list[tuple[str, int]] = []
    log = open_log(RedisLogBackend(private_redis.url, PIPELINE), spill_dir, events)
    big = prediction(5, blob="x" * (BULK_LIMIT + 1000))
    caplog.set_level(logging.ERROR, logger="airmlops.serving.prediction_log.writer")
    for i in range(25):
        assert log.log([big if i == 5 else prediction(i)]) == 1

    assert log.flush(120), "the poison entry must not hold the log back"
    stats = log.stats()
    assert (stats.quarantined, stats.logged, stats.dropped, stats.spilled) == (1, 24, 0, 0)
    assert stats.failed_writes >= ISOLATE_AFTER and stats.backend_up
    assert private_redis.stored() == [request_id(i) for i in range(25) if i != 5]
    assert ("quarantined", 1) in events
    assert sorted(spill_dir.glob("*.jsonl")) == [], "the spill file is replayed and deleted"

    [path], [header], [line] = quarantine_lines(spill_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    assert header["backend"] == log.backend.location
    entry = json.loads(line)
    assert entry["quarantined"]["error_type"] == "ResponseError"
    assert "bulk length" in entry["quarantined"]["error"]
    assert decode_entry(line) == big, "the quarantined entry is kept whole"
    [error] = [r for r in caplog.records if str(path) in r.getMessage()]
    assert error.levelno == logging.ERROR and "refused 1 entries" in error.getMessage()

    assert log.log([prediction(30)]) == 1  # the log goes on as usual
    assert log.flush(60) and private_redis.stored()[-1] == request_id(30)
    assert log.close()


def test_a_quarantine_file_moved_back_is_replayed_once_the_cause_is_fixed(
        private_redis: PrivateRedis, tmp_path: Path) -> None:
    with contextlib.closing(private_redis.client()) as client:
        client.config_set("proto-max-bulk-len", str(BULK_LIMIT))
    spill_dir = tmp_path / "spill"
    log = open_log(RedisLogBackend(private_redis.url, PIPELINE), spill_dir)
    big = prediction(1, blob="y" * (BULK_LIMIT + 10))
    assert log.log([prediction(0), big, prediction(2)]) == 3
    assert log.flush(120) and log.stats().quarantined == 1
    assert log.close()
    [path], _, _ = quarantine_lines(spill_dir)

    with contextlib.closing(private_redis.client()) as client:  # the cause, fixed
        client.config_set("proto-max-bulk-len", str(64 * BULK_LIMIT))
    os.rename(path, spill_dir / f"0-{secrets.token_hex(8)}.jsonl")
    again = open_log(RedisLogBackend(private_redis.url, PIPELINE), spill_dir)
    assert again.flush(60)
    stats = again.stats()
    assert (stats.logged, stats.quarantined, stats.dropped) == (1, 0, 0)
    assert private_redis.stored() == [request_id(0), request_id(2), request_id(1)]
    assert sorted(spill_dir.glob("*.jsonl")) == []
    assert again.close()


@pytest.fixture(params=["sqlite", "redis"])
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "redis":
        server: PrivateRedis = request.getfixturevalue("private_redis")
        return lambda: RedisLogBackend(server.url, PIPELINE), server.stored
    path = tmp_path / "predictions" / f"{PIPELINE}.sqlite"

    def stored() -> list[str]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return [r for (r,) in db.execute("SELECT request_id FROM predictions ORDER BY rowid")]

    return lambda: SqliteLogBackend(path), stored


def test_an_entry_the_backend_cannot_encode_is_quarantined_on_either_backend(
        backend_factory, tmp_path: Path) -> None:
    make_backend, stored = backend_factory
    spill_dir = tmp_path / "spill"
    log = open_log(make_backend(), spill_dir)
    poison = prediction(3, entity="C3-\ud800")  # a lone surrogate: not UTF-8, refused
    for i in range(12):
        assert log.log([poison if i == 3 else prediction(i)]) == 1

    assert log.flush(120)
    stats = log.stats()
    assert (stats.quarantined, stats.logged, stats.dropped) == (1, 11, 0)
    assert stored() == [request_id(i) for i in range(12) if i != 3]
    _, _, [line] = quarantine_lines(spill_dir)
    assert json.loads(line)["quarantined"]["error_type"] == "UnicodeEncodeError"
    assert decode_entry(line) == poison
    assert log.close()


def test_a_stopped_redis_is_not_quarantined_its_entries_wait_and_are_replayed(
        private_redis: PrivateRedis, tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    log = open_log(RedisLogBackend(private_redis.url, PIPELINE), spill_dir)
    assert log.log([prediction(0)]) == 1
    assert log.flush(60)
    private_redis.stop()
    for i in range(1, 21):
        assert log.log([prediction(i)]) == 1
    # Well past the refusals that would isolate a chunk if the backend answered.
    wait_until(lambda: log.stats().failed_writes >= 3 * ISOLATE_AFTER)
    assert log.stats().spilled == 20 and log.stats().quarantined == 0

    private_redis.start()
    assert log.flush(60)
    stats = log.stats()
    assert (stats.logged, stats.quarantined, stats.dropped, stats.spilled) == (21, 0, 0, 0)
    assert private_redis.stored() == [request_id(i) for i in range(21)]
    assert not (spill_dir / QUARANTINE_DIR).exists()
    assert log.close()
