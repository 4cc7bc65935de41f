"""The prediction log: what only the SQLite backend does, pipeline-name checks, and the
non-blocking buffered writer (with fake backends that fail, block or recover).

The contract both backends keep (windows, each row once, labels) is tested on SQLite and a
real Redis in tests/integration/test_prediction_log_backends.py."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from airmlops.serving.prediction_log import (
    LabelRecord,
    PredictionLog,
    PredictionRecord,
    SqliteLogBackend,
    open_backend,
    read_labels,
    read_predictions,
    sqlite_log_path,
)
from airmlops.settings import Settings

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def us(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def prediction(request_id: str, position: int = 0, at: dt.datetime = T0, *,
               probability: float | None = 0.75, entity: str = "C1") -> PredictionRecord:
    return PredictionRecord(
        request_id=request_id, position=position, ts_us=us(at), model_version="3",
        entity_id=entity, inputs={"customer_id": entity, "tenure_days": 12.0},
        features={"tenure_days": 12.0, "age": float("nan"), "plan": "basic"},
        prediction=1.0 if probability is None or probability >= 0.5 else 0.0,
        probability=probability,
    )


def label(request_id: str, entity: str = "C1", value: float = 1.0,
          at: dt.datetime = T0) -> LabelRecord:
    return LabelRecord(request_id=request_id, entity_id=entity, label=value, ts_us=us(at))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_root=tmp_path / "data", redis_url=None)


def _all(pipeline: str, settings: Settings):
    start, end = T0 - dt.timedelta(days=365), T0 + dt.timedelta(days=365)
    return (read_predictions(pipeline, start, end, settings=settings),
            read_labels(pipeline, start, end, settings=settings))


class FlakyBackend:
    """Fails while ``down`` is set; records what it stored; can block on ``gate``."""

    location = "memory"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.stored: list[PredictionRecord] = []
        self.labels: list[LabelRecord] = []
        self.calls = 0
        self.closed = False

    def write(self, predictions, labels) -> None:
        self.calls += 1
        self.gate.wait(5)
        if self.down.is_set():
            raise ConnectionError("backend is down")
        self.stored.extend(predictions)
        self.labels.extend(labels)

    def close(self) -> None:
        self.closed = True


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# --- SQLite backend and readers (the contract both backends keep is in
# tests/integration/test_prediction_log_backends.py) --------------------------------------


def test_the_sqlite_log_is_one_wal_file_under_the_data_root(settings: Settings) -> None:
    prediction_log = PredictionLog(open_backend("churn", settings))
    prediction_log.log([prediction("a" * 32, 0, T0)])
    assert prediction_log.close()
    path = sqlite_log_path(settings.data_root, "churn")
    assert path == (settings.data_root / "predictions" / "churn.sqlite").resolve()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert isinstance(open_backend("churn", settings), SqliteLogBackend)


def test_reading_a_log_that_does_not_exist_does_not_create_it(settings) -> None:
    predictions, labels = _all("nothing_yet", settings)
    assert predictions.empty and labels.empty
    assert not (settings.data_root / "predictions" / "nothing_yet.sqlite").exists()


@pytest.mark.parametrize("pipeline", ["../escape", "Churn", "a/b", "", "x" * 80, "churn\n"])
def test_pipeline_names_are_validated_before_they_become_paths(settings, pipeline) -> None:
    with pytest.raises(ValueError, match="invalid pipeline name"):
        read_predictions(pipeline, T0, T0, settings=settings)
    with pytest.raises(ValueError, match="invalid pipeline name"):
        open_backend(pipeline, settings)


# --- the buffered writer ------------------------------------------------------------------------


def test_log_returns_at_once_while_the_backend_is_slow() -> None:
    backend = FlakyBackend()
    backend.gate.clear()  # every write blocks
    events: list[tuple[str, int]] = []
    prediction_log = PredictionLog(backend, observer=lambda e, n: events.append((e, n)))
    started = time.perf_counter()
    for i in range(200):
        prediction_log.log([prediction(f"{i:032x}")])
    assert time.perf_counter() - started < 0.5
    assert prediction_log.stats().buffered == 200
    backend.gate.set()
    assert prediction_log.flush(5)
    assert [r.request_id for r in backend.stored] == [f"{i:032x}" for i in range(200)]
    stats = prediction_log.stats()
    assert (stats.logged, stats.buffered, stats.failed_writes, stats.dropped) == (200, 0, 0, 0)
    assert sum(n for e, n in events if e == "logged") == 200
    assert ("buffered", 0) in events
    prediction_log.close()


def test_entries_stay_buffered_while_the_backend_is_down_and_are_flushed_after() -> None:
    backend = FlakyBackend()
    backend.down.set()
    events: list[tuple[str, int]] = []
    prediction_log = PredictionLog(backend, retry_initial=0.01, retry_max=0.05,
                                   observer=lambda e, n: events.append((e, n)))
    prediction_log.log([prediction("e" * 32, 0), prediction("e" * 32, 1)])
    prediction_log.log_labels([label("f" * 32)])
    wait_until(lambda: prediction_log.stats().failed_writes >= 3)
    stats = prediction_log.stats()
    assert stats.buffered == 3 and stats.logged == 0 and not stats.backend_up
    assert not backend.stored
    assert ("backend_up", 0) in events

    backend.down.clear()
    assert prediction_log.flush(5)
    stats = prediction_log.stats()
    assert (stats.logged, stats.labels_logged, stats.buffered, stats.dropped) == (2, 1, 0, 0)
    assert stats.backend_up and stats.failed_writes >= 3
    assert [(r.request_id, r.position) for r in backend.stored] == [("e" * 32, 0), ("e" * 32, 1)]
    assert [r.request_id for r in backend.labels] == ["f" * 32]
    assert ("backend_up", 1) in events
    assert sum(n for e, n in events if e == "failed_writes") == stats.failed_writes
    prediction_log.close()


def test_beyond_the_buffer_bound_entries_are_dropped_and_counted() -> None:
    backend = FlakyBackend()
    backend.down.set()
    dropped: list[int] = []
    prediction_log = PredictionLog(backend, buffer_size=10, batch_size=4, retry_initial=0.01,
                                   retry_max=0.02,
                                   observer=lambda e, n: dropped.append(n) if e == "dropped"
                                   else None)
    accepted = [prediction_log.log([prediction(f"{i:032x}")]) for i in range(15)]
    assert accepted == [1] * 10 + [0] * 5
    assert prediction_log.log([prediction("1" * 32, p) for p in range(3)]) == 0
    stats = prediction_log.stats()
    assert stats.dropped == 8 and stats.buffered == 10 and sum(dropped) == 8
    backend.down.clear()
    assert prediction_log.flush(5)
    assert [r.request_id for r in backend.stored] == [f"{i:032x}" for i in range(10)]
    prediction_log.close()


def test_concurrent_producers_lose_nothing_and_duplicate_nothing(settings) -> None:
    prediction_log = PredictionLog(open_backend("churn", settings), batch_size=64)

    def produce(thread: int) -> None:
        for i in range(100):
            prediction_log.log([prediction(f"{thread:016x}{i:016x}")])

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert prediction_log.close()
    predictions, _ = _all("churn", settings)
    assert len(predictions) == 800
    assert predictions["request_id"].nunique() == 800
    assert prediction_log.stats().logged == 800


def test_close_flushes_and_counts_what_it_could_not_write() -> None:
    backend = FlakyBackend()
    prediction_log = PredictionLog(backend)
    prediction_log.log([prediction("2" * 32)])
    assert prediction_log.close(timeout=5) is True
    assert len(backend.stored) == 1 and backend.closed

    down = FlakyBackend()
    down.down.set()
    stuck = PredictionLog(down, retry_initial=0.01, retry_max=0.02)
    stuck.log([prediction("3" * 32), prediction("3" * 32, 1)])
    assert stuck.close(timeout=0.2) is False
    assert stuck.stats().dropped == 2 and stuck.stats().buffered == 0
    assert stuck.log([prediction("4" * 32)]) == 0  # closed: nothing more is accepted


def test_a_failing_observer_does_not_break_logging() -> None:
    def observer(event: str, amount: int) -> None:
        raise RuntimeError("metrics are broken")

    backend = FlakyBackend()
    prediction_log = PredictionLog(backend, observer=observer)
    assert prediction_log.log([prediction("5" * 32)]) == 1
    assert prediction_log.flush(5)
    assert len(backend.stored) == 1
    prediction_log.close()


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        PredictionLog(FlakyBackend(), buffer_size=0)
