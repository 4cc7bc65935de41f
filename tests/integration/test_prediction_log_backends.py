"""The prediction log's backend contract: one test body per behaviour, run on the SQLite file
and on a real Redis server.

Both backends must: give a window back in time order with its values intact, store each
``(request_id, position)`` once (a replayed batch is deduplicated) and the latest label per
``(request_id, entity_id)``, read windows half-open ``[start, end)``, refuse naive bounds, let
labels be matched to predictions by request id and entity, refuse a ``/feedback`` claim for a
request they never issued, and round-trip a batch larger than one read page. What only one
backend does (the SQLite file's place and mode, the Redis key records) is tested with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import math
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from airmlops.serving.prediction_log import (
    LabelRecord,
    LogBackend,
    PredictionLog,
    PredictionLogSettings,
    PredictionRecord,
    RedisLogBackend,
    open_backend,
    read_labels,
    read_predictions,
    request_key,
    sqlite_log_path,
    stream_keys,
)
from airmlops.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redis_fixture import redis_server  # noqa: F401  (a session fixture)

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
YEAR = dt.timedelta(days=365)
_pipelines = itertools.count()


def us(moment: dt.datetime) -> int:
    """Epoch microseconds of an aware datetime."""
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def request_id(i: int) -> str:
    return f"{i:032x}"


def prediction(i: int, position: int = 0, at: dt.datetime = T0, *,
               probability: float | None = 0.75, entity: str | None = None) -> PredictionRecord:
    entity = entity if entity is not None else f"C{i}-{position}"
    return PredictionRecord(
        request_id=request_id(i), position=position, ts_us=us(at), model_version="3",
        entity_id=entity, inputs={"customer_id": entity, "tenure_days": 12.0},
        features={"tenure_days": 12.0, "age": float("nan"), "plan": "basic"},
        prediction=1.0 if probability is None or probability >= 0.5 else 0.0,
        probability=probability,
    )


def label(i: int, value: float = 1.0, at: dt.datetime = T0 + HOUR, *,
          entity: str | None = None, position: int = 0) -> LabelRecord:
    entity = entity if entity is not None else f"C{i}-{position}"
    return LabelRecord(request_id=request_id(i), entity_id=entity, label=value, ts_us=us(at))


class LogStore:
    """One backend of the log for one test: its own pipeline name (on the shared Redis server
    every test sees only its own keys), how to open it, read it and count its raw rows."""

    def __init__(self, kind: str, data_root: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.pipeline = f"contract_{next(_pipelines)}"
        self.redis_url = redis_url
        self.settings = Settings(data_root=data_root, redis_url=None)
        self.log_settings = PredictionLogSettings(redis_url=redis_url)
        self._opened: list[LogBackend] = []

    def backend(self) -> LogBackend:
        backend = open_backend(self.pipeline, self.settings, self.log_settings)
        self._opened.append(backend)
        return backend

    def log(self, **options) -> PredictionLog:
        """A buffered writer on this store."""
        return PredictionLog(self.backend(), **options)

    def predictions(self, start: dt.datetime = T0 - YEAR,
                    end: dt.datetime = T0 + YEAR) -> pd.DataFrame:
        return read_predictions(self.pipeline, start, end, settings=self.settings,
                                log_settings=self.log_settings)

    def labels(self, start: dt.datetime = T0 - YEAR, end: dt.datetime = T0 + YEAR
               ) -> pd.DataFrame:
        return read_labels(self.pipeline, start, end, settings=self.settings,
                           log_settings=self.log_settings)

    def raw_predictions(self) -> list[tuple[str, int]]:
        """(request_id, position) of every stored prediction row, in the order written."""
        if self.redis_url is not None:
            with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
                return [(f[b"request_id"].decode(), int(f[b"position"]))
                        for _, f in client.xrange(stream_keys(self.pipeline)[0])]
        path = sqlite_log_path(self.settings.data_root, self.pipeline)
        with contextlib.closing(sqlite3.connect(path)) as db:
            return list(db.execute("SELECT request_id, position FROM predictions ORDER BY rowid"))

    def raw_label_count(self) -> int:
        """Label rows stored (a Redis stream also keeps the labels a newer one replaced)."""
        if self.redis_url is not None:
            with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
                return client.xlen(stream_keys(self.pipeline)[1])
        path = sqlite_log_path(self.settings.data_root, self.pipeline)
        with contextlib.closing(sqlite3.connect(path)) as db:
            return db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def close(self) -> None:
        for backend in self._opened:
            backend.close()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogStore]:
    url = request.getfixturevalue("redis_server") if request.param == "redis" else None
    store = LogStore(request.param, tmp_path / "data", url)
    yield store
    store.close()


# --- writing and reading a window ----------------------------------------------------------------


def test_a_window_reads_back_in_time_order_with_its_values(store: LogStore) -> None:
    log = store.log()
    log.log([prediction(2, 0, T0 + HOUR, probability=0.2)])  # logged first, later in time
    log.log([prediction(1, 0, T0, entity="C1"), prediction(1, 1, T0, entity="C2")])
    log.log_labels([label(1, 1.0, T0 + dt.timedelta(days=3), entity="C1")])
    assert log.close()

    frame = store.predictions(T0, T0 + HOUR)
    assert list(frame["request_id"]) == [request_id(1)] * 2  # the end is exclusive
    assert list(frame["position"]) == [0, 1]
    assert list(frame["entity_id"]) == ["C1", "C2"]
    first = frame.iloc[0]
    assert first["ts"] == T0
    assert first["model_version"] == "3"
    assert first["inputs"] == {"customer_id": "C1", "tenure_days": 12.0}
    assert first["features"] == {"tenure_days": 12.0, "age": None, "plan": "basic"}  # NaN: null
    assert first["probability"] == pytest.approx(0.75) and first["prediction"] == 1.0

    everything = store.predictions()
    assert list(everything["request_id"]) == [request_id(1)] * 2 + [request_id(2)]
    assert everything["ts"].is_monotonic_increasing
    later = store.predictions(T0 + dt.timedelta(minutes=1), T0 + dt.timedelta(days=1))
    assert list(later["request_id"]) == [request_id(2)]
    labels = store.labels(T0, T0 + dt.timedelta(days=7))
    assert labels[["request_id", "entity_id", "label"]].values.tolist() == [
        [request_id(1), "C1", 1.0]]
    assert labels.iloc[0]["ts"] == T0 + dt.timedelta(days=3)


def test_window_bounds_are_half_open(store: LogStore) -> None:
    backend = store.backend()
    backend.write([prediction(1, at=T0), prediction(2, at=T0 + HOUR - dt.timedelta(microseconds=1)),
                   prediction(3, at=T0 + HOUR)],
                  [label(1, at=T0), label(3, at=T0 + HOUR)])
    assert list(store.predictions(T0, T0 + HOUR)["request_id"]) == [request_id(1), request_id(2)]
    assert list(store.predictions(T0 + HOUR, T0 + 2 * HOUR)["request_id"]) == [request_id(3)]
    assert store.predictions(T0, T0).empty  # an empty window
    assert list(store.labels(T0, T0 + HOUR)["request_id"]) == [request_id(1)]
    assert list(store.labels(T0 + HOUR, T0 + 2 * HOUR)["request_id"]) == [request_id(3)]


@pytest.mark.parametrize("reader", ["predictions", "labels"])
def test_naive_bounds_and_reversed_windows_are_refused(store: LogStore, reader: str) -> None:
    read = store.predictions if reader == "predictions" else store.labels
    with pytest.raises(ValueError, match="timezone-aware"):
        read(T0.replace(tzinfo=None), T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        read(T0, T0.replace(tzinfo=None) + HOUR)
    with pytest.raises(ValueError, match="before its start"):
        read(T0, T0 - dt.timedelta(seconds=1))


def test_reading_a_log_never_written_gives_empty_typed_frames(store: LogStore) -> None:
    predictions, labels = store.predictions(), store.labels()
    assert predictions.empty and labels.empty
    assert list(predictions.columns) == ["request_id", "position", "ts", "model_version",
                                         "entity_id", "inputs", "features", "prediction",
                                         "probability"]
    assert list(labels.columns) == ["request_id", "entity_id", "label", "ts"]
    assert str(predictions["ts"].dtype) == str(labels["ts"].dtype) == "datetime64[us, UTC]"


def test_numpy_values_are_stored_as_json_numbers(store: LogStore) -> None:
    record = dataclasses.replace(prediction(9), features={
        "count": np.int64(3), "share": np.float64(0.25), "missing": np.float64("nan")})
    store.backend().write([record], [])
    assert store.predictions().iloc[0]["features"] == {"count": 3, "share": 0.25,
                                                       "missing": None}


def test_regression_rows_have_no_probability(store: LogStore) -> None:
    store.backend().write([prediction(4, probability=None)], [])
    row = store.predictions().iloc[0]
    assert math.isnan(row["probability"]) and row["prediction"] == 1.0


def test_a_large_batch_round_trips(store: LogStore) -> None:
    """More rows than one Redis read page (10,000), in one write."""
    count = 12_500
    batch = [prediction(i, at=T0 + dt.timedelta(milliseconds=i)) for i in range(count)]
    store.backend().write(batch, [label(i) for i in range(0, count, 5)])
    predictions = store.predictions()
    assert len(predictions) == count
    assert list(predictions["request_id"]) == [request_id(i) for i in range(count)]
    assert predictions["ts"].iloc[-1] == T0 + dt.timedelta(milliseconds=count - 1)
    assert len(store.labels()) == count // 5


# --- each row once -------------------------------------------------------------------------------


def test_writing_the_same_batch_twice_stores_each_row_once(store: LogStore) -> None:
    backend = store.backend()
    batch = [prediction(i, p) for i in range(3) for p in range(2)]
    labels = [label(0), label(1, 0.0)]
    backend.write(batch, labels)
    backend.write(batch, labels)  # a retried or replayed batch
    assert store.raw_predictions() == [(request_id(i), p) for i in range(3) for p in range(2)]
    assert store.raw_label_count() == 2
    predictions, stored_labels = store.predictions(), store.labels()
    assert len(predictions) == 6 and not predictions.duplicated(["request_id", "position"]).any()
    assert sorted(zip(stored_labels["request_id"], stored_labels["label"], strict=True)) == [
        (request_id(0), 1.0), (request_id(1), 0.0)]

    backend.write([], [label(1, 1.0, T0 + HOUR + dt.timedelta(microseconds=5))])  # newer
    backend.write([], [label(1, 0.0)])  # the older one, replayed, does not come back
    stored_labels = store.labels()
    assert stored_labels[stored_labels["request_id"] == request_id(1)]["label"].tolist() == [1.0]
    assert store.raw_label_count() == (3 if store.kind == "redis" else 2)

    # The record of what a request predicted (checked by /feedback) still holds its entities.
    if isinstance(backend, RedisLogBackend):
        with contextlib.closing(redis.Redis.from_url(store.redis_url)) as client:
            assert client.smembers(request_key(store.pipeline, request_id(2))) == {
                b"C2-0", b"C2-1"}
    assert backend.claim_labels(request_id(2), [label(2, 1.0, position=1)]).stored
    assert not backend.claim_labels(request_id(2), [label(2, 0.0, position=1)]).stored


def test_a_batch_rewritten_with_a_later_label_keeps_the_label(store: LogStore) -> None:
    backend = store.backend()
    batch = [prediction(12, 0), prediction(12, 1)]
    backend.write(batch, [label(12, 0.0)])
    backend.write(batch, [label(12, 1.0, T0 + HOUR + dt.timedelta(seconds=5))])  # a retry
    assert len(store.predictions()) == 2
    assert store.labels()["label"].tolist() == [1.0]


# --- labels and the predictions they belong to ---------------------------------------------------


def test_labels_match_predictions_by_request_and_entity(store: LogStore) -> None:
    backend = store.backend()
    backend.write([prediction(1, 0, entity="C1"), prediction(1, 1, entity="C2"),
                   prediction(2, 0, entity="C1")], [])
    assert backend.claim_labels(request_id(1), [label(1, 0.0, entity="C2")]).stored
    assert backend.claim_labels(request_id(2), [label(2, 1.0, entity="C1")]).stored

    claim = backend.claim_labels(request_id(2), [label(2, 1.0, entity="C2")])  # not request 2's
    assert claim.issued and claim.unknown_entities == ("C2",) and not claim.stored
    claim = backend.claim_labels(request_id(1), [label(1, 1.0, entity="C2")])  # given already
    assert claim.conflicts == ("C2",) and not claim.stored
    assert backend.claim_labels(request_id(1), [label(1, 1.0, T0 + 2 * HOUR, entity="C2")],
                                overwrite=True).stored

    matched = store.predictions().merge(
        store.labels().rename(columns={"ts": "label_ts"}), on=["request_id", "entity_id"])
    assert sorted(zip(matched["request_id"], matched["entity_id"], matched["label"],
                      strict=True)) == [(request_id(1), "C2", 1.0), (request_id(2), "C1", 1.0)]


def test_a_claim_for_a_request_never_issued_is_refused_and_stores_nothing(store) -> None:
    backend = store.backend()
    backend.write([prediction(1)], [])
    claim = backend.claim_labels(request_id(99), [label(99)])
    assert not claim.issued and not claim.stored
    assert store.labels().empty
    # The buffered log path does not check: a label written through it is stored as given,
    # and matches no prediction.
    backend.write([], [label(98)])
    assert store.labels()["request_id"].tolist() == [request_id(98)]
    assert store.predictions().merge(store.labels(), on=["request_id", "entity_id"]).empty
