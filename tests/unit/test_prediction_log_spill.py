"""Nothing the prediction log accepted is lost while its backend is down: the writer spills to
an fsync'ed file, replays it in order once the backend answers, adopts the spill files of a
killed writer, and every row is stored once. One test body per behaviour, on SQLite and on a
real Redis server that the test stops and starts. (That each backend stores a replayed batch
once is part of the backend contract: tests/integration/test_prediction_log_backends.py.)

"Down" is real: for Redis the server is shut down (saving its data) and started again on the
same port; for SQLite the log's folder is taken by a plain file, so the database cannot be
opened, and given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from airmlops.serving.prediction_log import (
    LabelRecord,
    LogBackend,
    PredictionLog,
    PredictionLogSettings,
    PredictionRecord,
    RedisLogBackend,
    SqliteLogBackend,
    open_backend,
    open_log,
    read_labels,
    read_predictions,
    spill_dir_path,
    sqlite_log_path,
)
from airmlops.serving.prediction_log import writer as prediction_log_writer
from airmlops.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from redis_fixture import PrivateRedis, _free_port

PIPELINE = "churn"
T0_US = 1_772_366_400_000_000  # 2026-03-01 12:00 UTC
WINDOW = (dt.datetime(2026, 2, 1, tzinfo=dt.UTC), dt.datetime(2026, 4, 1, tzinfo=dt.UTC))
SRC = Path(__file__).resolve().parents[2] / "include"


def request_id(i: int) -> str:
    return f"{i:032x}"


def prediction(i: int, position: int = 0) -> PredictionRecord:
    return PredictionRecord(
        request_id=request_id(i), position=position, ts_us=T0_US + i * 1000 + position,
        model_version="3", entity_id=f"C{i}-{position}",
        inputs={"customer_id": f"C{i}-{position}", "tenure_days": 12.5},
        features={"tenure_days": 12.5, "plan": "basic"}, prediction=1.0, probability=0.75)


def label(i: int, value: float = 1.0, *, later_us: int = 0, position: int = 0) -> LabelRecord:
    return LabelRecord(request_id=request_id(i), entity_id=f"C{i}-{position}", label=value,
                       ts_us=T0_US + 10_000_000 + later_us)


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class LogStore:
    """One backend of the log that a test can take down and bring back, and read raw."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.data_root = tmp_path / "data"
        self.spill_dir = spill_dir_path(self.data_root, PIPELINE)
        self.redis: PrivateRedis | None = None
        if kind == "redis":
            workdir = tmp_path / "redis"
            workdir.mkdir()
            self.redis = PrivateRedis(workdir)
            self.redis.start()
        url = self.redis.url if self.redis else None
        self.settings = Settings(data_root=self.data_root, redis_url=None)
        self.log_settings = PredictionLogSettings(redis_url=url)
        self.sqlite_path = sqlite_log_path(self.data_root, PIPELINE)

    def backend(self) -> LogBackend:
        return open_backend(PIPELINE, self.settings, self.log_settings)

    def down(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        else:  # the log's folder becomes a file: the database cannot be opened
            self.sqlite_path.parent.parent.mkdir(parents=True, exist_ok=True)
            self.sqlite_path.parent.write_text("not a folder")

    def up(self) -> None:
        if self.redis is not None:
            self.redis.start()
        else:
            self.sqlite_path.parent.unlink()

    def raw_predictions(self) -> list[tuple[str, int]]:
        """(request_id, position) of every stored prediction row, in the order written."""
        if self.redis is not None:
            client = redis.Redis.from_url(self.redis.url)
            try:
                return [(f[b"request_id"].decode(), int(f[b"position"]))
                        for _, f in client.xrange(f"{PIPELINE}:predictions")]
            finally:
                client.close()
        with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
            return [(r, p) for r, p in db.execute(
                "SELECT request_id, position FROM predictions ORDER BY rowid")]

    def raw_label_count(self) -> int:
        if self.redis is not None:
            client = redis.Redis.from_url(self.redis.url)
            try:
                return client.xlen(f"{PIPELINE}:labels")
            finally:
                client.close()
        with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
            return db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def read(self):
        return (read_predictions(PIPELINE, *WINDOW, settings=self.settings,
                                 log_settings=self.log_settings),
                read_labels(PIPELINE, *WINDOW, settings=self.settings,
                            log_settings=self.log_settings))

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogStore]:
    store = LogStore(request.param, tmp_path)
    yield store
    store.close()


def spill_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


# --- spill and replay --------------------------------------------------------------------------


def test_entries_spill_while_the_backend_is_down_and_replay_in_order_once(store, monkeypatch):
    spill_fsyncs: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(store.spill_dir)):
            spill_fsyncs.append(target)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    store.down()
    events: list[tuple[str, int]] = []
    log = PredictionLog(store.backend(), batch_size=10, retry_initial=0.05, retry_max=0.2,
                        spill_dir=store.spill_dir, observer=lambda e, n: events.append((e, n)))
    for i in range(45):
        assert log.log([prediction(i, 0), prediction(i, 1)]) == 2
    assert log.log_labels([label(0), label(1)]) == 2
    wait_until(lambda: log.stats().spilled == 92)

    stats = log.stats()
    assert (stats.buffered, stats.dropped, stats.logged) == (0, 0, 0)
    assert stats.state == "spilling" and not stats.backend_up and stats.failed_writes >= 1
    assert (store.spill_dir.stat().st_mode & 0o777) == 0o700
    [spilled] = spill_files(store.spill_dir)
    assert re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{16}}\.jsonl", spilled.name)
    header, *lines = spilled.read_bytes().splitlines()
    assert json.loads(header)["backend"] == log.backend.location
    assert len(lines) == 92
    assert [json.loads(line)["kind"] for line in lines[-2:]] == ["label", "label"]
    assert len(spill_fsyncs) >= 92 // 10  # every spilled batch (at most 10 entries) is fsync'ed
    assert ("spilled", 92) in events and ("backend_up", 0) in events

    store.up()
    assert log.flush(20)
    stats = log.stats()
    assert (stats.logged, stats.labels_logged, stats.spilled, stats.dropped) == (90, 2, 0, 0)
    assert stats.state == "ok" and stats.backend_up
    assert spill_files(store.spill_dir) == []
    assert store.raw_predictions() == [(request_id(i), p) for i in range(45) for p in (0, 1)]
    assert store.raw_label_count() == 2
    assert ("spilled", 0) in events  # heard before flush() returned
    assert log.close()


def test_memory_drains_to_disk_so_an_outage_longer_than_the_buffer_drops_nothing(store):
    store.down()
    log = PredictionLog(store.backend(), buffer_size=100, batch_size=50, linger=0.01,
                        retry_initial=0.2, retry_max=0.5, spill_dir=store.spill_dir)
    for round_ in range(10):  # 8 times what memory holds
        assert log.log([prediction(round_ * 80 + k) for k in range(80)]) == 80
        wait_until(lambda: log.stats().buffered == 0)
    stats = log.stats()
    assert (stats.spilled, stats.dropped) == (800, 0)

    store.up()
    assert log.log([prediction(800)]) == 1  # newer than the spill: written after it
    assert log.flush(30)
    assert store.raw_predictions() == [(request_id(i), 0) for i in range(801)]
    assert log.close()


def test_close_with_the_backend_down_spills_and_the_next_log_replays(store):
    store.down()
    log = PredictionLog(store.backend(), batch_size=4, linger=30.0, retry_initial=60,
                        retry_max=60, spill_dir=store.spill_dir)
    for i in range(10):
        log.log([prediction(i)])
    assert log.close(timeout=0.3) is False
    stats = log.stats()
    assert (stats.spilled, stats.dropped, stats.buffered) == (10, 0, 0)
    [left] = spill_files(store.spill_dir)
    assert len(left.read_bytes().splitlines()) == 11

    store.up()
    successor = PredictionLog(store.backend(), spill_dir=store.spill_dir)
    assert successor.stats().spilled == 10  # adopted at start: its writer let go of it
    assert successor.flush(20)
    assert store.raw_predictions() == [(request_id(i), 0) for i in range(10)]
    assert spill_files(store.spill_dir) == []
    assert successor.stats().logged == 10 and successor.close()


def test_spilled_values_round_trip_exactly(store):
    tricky = PredictionRecord(
        request_id=request_id(7), position=0, ts_us=T0_US, model_version="3",
        entity_id="C\n7 ü\"", inputs={"customer_id": "C\n7 ü\"", "tiny": 5e-324,
                                      "huge": 1.7976931348623157e308, "big": 2**70,
                                      "third": 1 / 3},
        features={"sum": 0.1 + 0.2, "missing": float("nan"), "plan": "basic"},
        prediction=0.1 + 0.2, probability=2 / 3)
    store.down()
    log = PredictionLog(store.backend(), retry_initial=0.05, retry_max=0.1,
                        spill_dir=store.spill_dir)
    log.log([tricky])
    log.log_labels([LabelRecord(request_id(7), "C\n7 ü\"", 0.1 + 0.7, T0_US + 1)])
    wait_until(lambda: log.stats().spilled == 2)
    store.up()
    assert log.flush(20) and log.close()

    predictions, labels = store.read()
    row = predictions.iloc[0]
    assert row["entity_id"] == tricky.entity_id
    assert row["prediction"] == 0.1 + 0.2 and row["probability"] == 2 / 3
    assert row["inputs"] == tricky.inputs
    assert row["features"] == {"sum": 0.1 + 0.2, "missing": None, "plan": "basic"}
    assert labels["label"].tolist() == [0.1 + 0.7]


def test_beyond_the_disk_bound_entries_are_dropped_counted_and_logged_once(tmp_path, caplog):
    store = LogStore("sqlite", tmp_path)
    store.down()
    bound = 4096
    log = PredictionLog(store.backend(), batch_size=10, retry_initial=0.05, retry_max=0.1,
                        spill_dir=store.spill_dir, spill_max_bytes=bound)
    with caplog.at_level(logging.ERROR, logger="airmlops.serving.prediction_log"):
        for i in range(100):
            log.log([prediction(i)])
        wait_until(lambda: (s := log.stats()).spilled + s.dropped == 100 and s.buffered == 0)
    stats = log.stats()
    assert stats.spilled > 0 and stats.dropped > 0
    assert stats.seconds_since_drop is not None and stats.seconds_since_drop < 60
    assert sum(p.stat().st_size for p in store.spill_dir.iterdir()) <= bound
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "spill directory is full" in errors[0].getMessage()

    store.up()
    assert log.flush(20)
    assert store.raw_predictions() == [(request_id(i), 0) for i in range(stats.spilled)]
    assert log.close()


# --- a killed writer -----------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {src!r})
    from airmlops.serving.prediction_log import (
        PredictionLog, PredictionLogSettings, PredictionRecord, open_backend)
    from airmlops.settings import Settings

    settings = Settings(data_root=Path({data_root!r}), redis_url=None)
    backend = open_backend("churn", settings, PredictionLogSettings(redis_url={url!r}))
    log = PredictionLog(backend, batch_size=7, retry_initial=600, retry_max=600,
                        spill_dir=Path({spill_dir!r}))
    for i in range({count}):
        log.log([PredictionRecord(
            request_id=f"{{i:032x}}", position=0, ts_us={t0} + i * 1000, model_version="3",
            entity_id=f"C{{i}}-0", inputs={{"customer_id": f"C{{i}}-0", "tenure_days": 12.5}},
            features={{"tenure_days": 12.5, "plan": "basic"}}, prediction=1.0,
            probability=0.75)])
    deadline = time.monotonic() + 60
    while log.stats().spilled < {count} and time.monotonic() < deadline:
        time.sleep(0.01)
    print("spilled" if log.stats().spilled == {count} else "not spilled", flush=True)
    sys.stdin.read()  # parked until killed (or until the test process goes away)
""")


@pytest.mark.parametrize("adopted", ["at start", "after a write"])
def test_a_killed_writer_s_spill_is_adopted_and_stored_exactly_once(store, adopted,
                                                                     monkeypatch):
    count = 40
    store.down()
    script = CHILD.format(src=str(SRC), data_root=str(store.data_root),
                          url=store.redis.url if store.redis else None,
                          spill_dir=str(store.spill_dir), count=count, t0=T0_US)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spilled"
        store.up()
        monkeypatch.setattr(prediction_log_writer, "ADOPT_INTERVAL_S", 0.0)
        survivor = None
        if adopted == "after a write":  # a live worker; the orphan appears later
            survivor = PredictionLog(store.backend(), spill_dir=store.spill_dir)
            assert survivor.stats().spilled == 0  # the child holds its file's lock
        # The child's replay committed a first chunk, then it was killed before deleting the
        # file: the adopter writes that chunk again.
        committed = store.backend()
        committed.write([prediction(i) for i in range(10)], [])
        committed.close()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdin.close()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    [orphan] = spill_files(store.spill_dir)
    assert orphan.name.startswith(f"{child.pid}-")

    if survivor is None:
        survivor = PredictionLog(store.backend(), spill_dir=store.spill_dir)
        assert survivor.stats().spilled == count
    else:
        survivor.log([prediction(1000)])  # a successful write looks for orphans
        wait_until(lambda: survivor.stats().logged >= 1)
    assert survivor.flush(20)
    stored = store.raw_predictions()
    assert sorted(stored) == sorted({(request_id(i), 0) for i in [*range(count), 1000]}
                                    if adopted == "after a write"
                                    else {(request_id(i), 0) for i in range(count)})
    assert len(stored) == len(set(stored))
    assert spill_files(store.spill_dir) == []
    assert survivor.close()


def test_a_spill_file_of_another_backend_is_left_alone(tmp_path):
    """Services of one pipeline share its spill folder; a file spilled for another backend is
    never replayed into this one."""
    store = LogStore("sqlite", tmp_path)
    (tmp_path / "elsewhere").write_text("not a folder")  # the other backend is down
    other = SqliteLogBackend(tmp_path / "elsewhere" / "churn.sqlite")
    log = PredictionLog(other, retry_initial=60, retry_max=60, spill_dir=store.spill_dir)
    log.log([prediction(1)])
    wait_until(lambda: log.stats().spilled == 1)
    assert log.close(timeout=0.1) is False
    mine = PredictionLog(store.backend(), spill_dir=store.spill_dir)
    assert mine.stats().spilled == 0 and len(spill_files(store.spill_dir)) == 1
    assert mine.close()


# --- where a log spills --------------------------------------------------------------------------
# (that both backends store a replayed batch once is in
# tests/integration/test_prediction_log_backends.py)


def test_open_log_spills_under_the_data_root_unless_the_bound_is_zero(tmp_path):
    settings = Settings(data_root=tmp_path / "data", redis_url=None)
    log = open_log(PIPELINE, settings)
    assert log.spill_dir == (tmp_path / "data" / "prediction-log" / "spill" / PIPELINE).resolve()
    assert log.spill_dir.is_dir() and log.spill_max_bytes == 1 << 30
    assert log.close()
    off = open_log(PIPELINE, settings, log_settings=PredictionLogSettings(spill_max_bytes=0))
    assert off.spill_dir is None and off.close()
    with pytest.raises(ValueError, match="invalid pipeline name"):
        spill_dir_path(tmp_path, "../escape")


# --- what the service answers --------------------------------------------------------------------


class BentoReadyz:
    """Stands for BentoML's own /readyz handler: a status code and a plain-text body."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"\n"})


def _readyz(downstream: BentoReadyz, log: PredictionLog | None) -> tuple[int, dict, dict]:
    from airmlops.serving.service import RequestGate

    gate = RequestGate(downstream, token="", max_body_bytes=1000, model_version="7",
                       validators={}, metrics=lambda: None,
                       log_stats=lambda: None if log is None else log.stats())
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(gate({"type": "http", "path": "/readyz", "method": "GET", "headers": []},
                     receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:])), \
        headers


def test_readyz_stays_200_and_says_degraded_while_the_log_spills(tmp_path):
    store = LogStore("sqlite", tmp_path)
    store.down()
    log = PredictionLog(store.backend(), retry_initial=0.05, retry_max=0.1,
                        spill_dir=store.spill_dir)
    log.log([prediction(1)])
    wait_until(lambda: log.stats().spilled == 1)

    status, body, headers = _readyz(BentoReadyz(200), log)
    assert status == 200 and headers["x-model-version"] == "7"
    assert body["status"] == "degraded"
    assert body["prediction_log"]["state"] == "spilling"
    assert body["prediction_log"]["spilled"] == 1 and body["prediction_log"]["dropped"] == 0
    status, body, _ = _readyz(BentoReadyz(503), log)  # BentoML's check decides the code
    assert status == 503 and body["status"] == "not_ready"

    store.up()
    assert log.flush(20)
    status, body, _ = _readyz(BentoReadyz(200), log)
    assert status == 200 and body["status"] == "ready"
    assert body["prediction_log"] == {**log.stats().to_dict(), "state": "ok"}
    assert log.close()
    assert _readyz(BentoReadyz(200), None)[1] == {"status": "ready"}  # before the service


@pytest.mark.parametrize("down", ["redis", "sqlite"])
def test_feedback_answers_503_with_retry_after_when_the_log_store_is_down(tmp_path, down):
    from sklearn.dummy import DummyClassifier

    from airmlops.features.online import SqliteOnlineStore
    from airmlops.serving.service import ServingConfig, ServingRuntime, claim_labels_waiting
    from airmlops.spec import load_spec

    if down == "redis":  # nothing listens there
        label_backend: LogBackend = RedisLogBackend(f"redis://127.0.0.1:{_free_port()}/0",
                                                    PIPELINE, timeout=1.0)
    else:  # the database file is a folder: SQLite cannot open it
        (tmp_path / "log.sqlite").mkdir()
        label_backend = SqliteLogBackend(tmp_path / "log.sqlite")
    spec = load_spec(SRC / "pipelines" / "churn.yaml")
    config = ServingConfig(pipeline=PIPELINE, model_name=PIPELINE, model_version="7",
                           model_uri="models:/churn/7", spec_hash="x", features_hash="y")
    model = DummyClassifier().fit([[0], [1]], [0, 1])
    runtime = ServingRuntime(
        config, spec, model, SqliteOnlineStore(tmp_path / "online.sqlite", PIPELINE),
        PredictionLog(SqliteLogBackend(tmp_path / "predictions.sqlite")), fast_path=False,
        label_backend=label_backend)
    try:
        status, body, headers = asyncio.run(claim_labels_waiting(
            runtime, request_id(1), [{"entity": "C1-0", "label": 1}], overwrite=False,
            wait_s=0.2))
    finally:
        runtime.close()
    assert status == 503
    assert headers == {"Retry-After": "5"}
    assert body["error"] == "unavailable" and body["request_id"] == request_id(1)
    assert "labels were not recorded" in body["message"]


def test_the_appended_records_are_bounded_with_the_requests_they_belong_to(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        backend = RedisLogBackend(server.url, "bounded", maxlen=3)
        for i in range(5):
            backend.write([prediction(i)], [label(i)])
        client = redis.Redis.from_url(server.url)
        kept = {key.decode() for key in client.scan_iter("bounded:appended:*")}
        assert kept == {f"bounded:appended:{request_id(i)}" for i in range(2, 5)}
        assert client.ttl(f"bounded:appended:{request_id(4)}") > 0
        client.close()
        backend.close()
    finally:
        server.stop()
