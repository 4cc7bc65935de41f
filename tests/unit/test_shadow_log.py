"""The shadow log on both backends (the SQLite file and a real Redis server): shadow rows are
stored apart from the live predictions (read_predictions never sees them, no label claim finds
them), each (request_id, position) once and bounded, and read_shadow_pairs joins them with the
live rows of the same request and position and with the live request's labels."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import redis

from airmlops.serving.prediction_log import (
    SHADOW_PAIR_COLUMNS,
    LabelRecord,
    LogBackend,
    PredictionLogSettings,
    PredictionRecord,
    RedisLogBackend,
    ShadowBackend,
    SqliteLogBackend,
    open_backend,
    open_shadow_log,
    read_predictions,
    read_shadow_pairs,
    shadow_appended_key,
    shadow_stream_key,
    sqlite_log_path,
)
from airmlops.serving.prediction_log.reading import SHADOW_MARGIN_US
from airmlops.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from redis_fixture import redis_server  # noqa: F401  (a session fixture)

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
_pipelines = itertools.count()


def us(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def rid(i: int) -> str:
    return f"{i:032x}"


def record(i: int, position: int = 0, *, at: dt.datetime = T0, version: str = "1",
           score: float = 0.75, entity: str | None = None) -> PredictionRecord:
    entity = entity if entity is not None else f"C{i}-{position}"
    return PredictionRecord(
        request_id=rid(i), position=position, ts_us=us(at), model_version=version,
        entity_id=entity, inputs={"customer_id": entity}, features={"tenure_days": 3.0},
        prediction=float(score >= 0.5), probability=score)


class Store:
    """One backend for one test, under a pipeline name of its own."""

    def __init__(self, kind: str, data_root: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.pipeline = f"shadow_{next(_pipelines)}"
        self.redis_url = redis_url
        self.settings = Settings(data_root=data_root, redis_url=None)
        self.log_settings = PredictionLogSettings(redis_url=redis_url)
        self._opened: list[LogBackend] = []

    def backend(self) -> LogBackend:
        backend = open_backend(self.pipeline, self.settings, self.log_settings)
        self._opened.append(backend)
        return backend

    def pairs(self, start: dt.datetime = T0 - HOUR, end: dt.datetime = T0 + HOUR,
              **options) -> pd.DataFrame:
        return read_shadow_pairs(self.pipeline, start, end, settings=self.settings,
                                 log_settings=self.log_settings, **options)

    def predictions(self) -> pd.DataFrame:
        return read_predictions(self.pipeline, T0 - 24 * HOUR, T0 + 24 * HOUR,
                                settings=self.settings, log_settings=self.log_settings)

    def raw_shadow(self) -> list[tuple[str, int]]:
        """(request_id, position) of every stored shadow row, in the order written."""
        if self.redis_url is not None:
            with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
                return [(f[b"request_id"].decode(), int(f[b"position"]))
                        for _, f in client.xrange(shadow_stream_key(self.pipeline))]
        path = sqlite_log_path(self.settings.data_root, self.pipeline)
        with contextlib.closing(sqlite3.connect(path)) as db:
            return list(db.execute(
                "SELECT request_id, position FROM shadow_predictions ORDER BY rowid"))

    def close(self) -> None:
        for backend in self._opened:
            backend.close()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("redis_server") if request.param == "redis" else None
    store = Store(request.param, tmp_path / "data", url)
    yield store
    store.close()


def test_shadow_rows_never_reach_the_live_predictions_or_a_label_claim(store: Store) -> None:
    backend = store.backend()
    backend.write([record(1)], [])
    backend.write_shadow([record(1, version="2"), record(2, version="2")])
    live = store.predictions()
    assert list(live["request_id"]) == [rid(1)]
    assert set(live["model_version"]) == {"1"}
    label = LabelRecord(request_id=rid(2), entity_id="C2-0", label=1.0, ts_us=us(T0))
    claim = backend.claim_labels(rid(2), [label])
    assert not claim.issued and not claim.stored  # request 2 exists only as a shadow row


def test_a_shadow_batch_written_twice_is_stored_once(store: Store) -> None:
    backend = store.backend()
    batch = [record(1, 0), record(1, 1), record(2, 0)]
    backend.write_shadow(batch)
    backend.write_shadow(batch)  # a retry
    backend.write_shadow([record(1, 1, score=0.1)])  # the same (request, position) again
    assert sorted(store.raw_shadow()) == [(rid(1), 0), (rid(1), 1), (rid(2), 0)]
    assert len(store.pairs()) == 0  # no live rows: nothing to pair with


def test_pairs_join_by_request_id_and_position_with_the_live_labels(store: Store) -> None:
    backend = store.backend()
    backend.write([record(1, 0, score=0.9, entity="A"), record(1, 1, score=0.2, entity="B"),
                   record(2, 0, score=0.6, at=T0 + dt.timedelta(minutes=1)),
                   record(3, 0, score=0.3)],
                  [LabelRecord(request_id=rid(1), entity_id="A", label=1.0,
                               ts_us=us(T0 + dt.timedelta(minutes=5))),
                   LabelRecord(request_id=rid(1), entity_id="B", label=0.0,
                               ts_us=us(T0 + 2 * HOUR))])  # after the labels' end
    backend.write_shadow([
        record(1, 1, score=0.7, version="2", entity="B",
               at=T0 + dt.timedelta(seconds=2)),  # logged first, later in time
        record(1, 0, score=0.4, version="2", entity="A", at=T0 + dt.timedelta(seconds=1)),
        record(2, 0, score=0.5, version="2"),
        record(3, 0, score=0.3, version="2", entity="someone else"),  # not the live entity
        record(4, 0, score=0.8, version="2"),  # no live row
    ])
    pairs = store.pairs()
    assert list(pairs.columns) == list(SHADOW_PAIR_COLUMNS)
    assert pairs[["request_id", "position", "entity_id"]].values.tolist() == [
        [rid(1), 0, "A"], [rid(1), 1, "B"], [rid(2), 0, "C2-0"]]
    assert list(pairs["live_version"]) == ["1"] * 3
    assert list(pairs["shadow_version"]) == ["2"] * 3
    assert list(pairs["live_probability"]) == pytest.approx([0.9, 0.2, 0.6])
    assert list(pairs["shadow_probability"]) == pytest.approx([0.4, 0.7, 0.5])
    assert list(pairs["live_prediction"]) == [1.0, 0.0, 1.0]
    assert list(pairs["shadow_prediction"]) == [0.0, 1.0, 1.0]
    assert pairs["ts"].tolist() == [T0, T0, T0 + dt.timedelta(minutes=1)]  # the live ts
    assert pairs["label"].tolist()[0] == 1.0
    assert pairs["label"].isna().tolist() == [False, True, True]
    later = store.pairs(labels_end=T0 + 3 * HOUR)
    assert later["label"].tolist()[:2] == [1.0, 0.0]
    # the window is the live rows'
    assert list(store.pairs(T0 + dt.timedelta(seconds=30), T0 + HOUR)["request_id"]) == [rid(2)]


def test_a_shadow_row_pairs_within_the_margin_of_its_live_row(store: Store) -> None:
    backend = store.backend()
    backend.write([record(1, at=T0 + HOUR - dt.timedelta(seconds=1)), record(2)], [])
    margin = dt.timedelta(microseconds=SHADOW_MARGIN_US)
    backend.write_shadow([record(1, at=T0 + HOUR + margin - dt.timedelta(seconds=2)),
                          record(2, at=T0 + HOUR + margin)])  # beyond the margin
    assert list(store.pairs(T0, T0 + HOUR)["request_id"]) == [rid(1)]


def test_an_empty_window_has_the_pair_columns(store: Store) -> None:
    pairs = store.pairs()
    assert pairs.empty and list(pairs.columns) == list(SHADOW_PAIR_COLUMNS)


def test_the_shadow_log_writer_stores_apart_and_refuses_labels(store: Store) -> None:
    events: list[tuple[str, int]] = []
    shadow_log = open_shadow_log(store.pipeline, store.settings,
                                 log_settings=store.log_settings,
                                 observer=lambda event, n: events.append((event, n)))
    assert shadow_log.spill_dir is None  # best-effort: never spilled
    store.backend().write([record(5, 0), record(5, 1)], [])
    assert shadow_log.log([record(5, 0, version="2"), record(5, 1, version="2")]) == 2
    assert shadow_log.close()
    assert ("logged", 2) in events
    assert sorted(store.raw_shadow()) == [(rid(5), 0), (rid(5), 1)]
    assert set(store.predictions()["model_version"]) == {"1"}
    assert len(store.pairs()) == 2
    shadow = ShadowBackend(store.backend())
    with pytest.raises(ValueError, match="takes no labels"):
        shadow.write([], [LabelRecord(request_id=rid(5), entity_id="C5-0", label=1.0,
                                      ts_us=us(T0))])
    assert not shadow.claim_labels(rid(5), []).issued


def test_shadow_rows_are_dropped_and_counted_while_the_backend_is_down(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    (data_root / "predictions").mkdir(parents=True)
    sqlite_log_path(data_root, "down").mkdir()  # the log file's place is a folder: unusable
    events: list[tuple[str, int]] = []
    shadow_log = open_shadow_log("down", Settings(data_root=data_root, redis_url=None),
                                 log_settings=PredictionLogSettings(),
                                 observer=lambda event, n: events.append((event, n)))
    shadow_log.log([record(1), record(2)])
    assert not shadow_log.close(timeout=0.5)
    stats = shadow_log.stats()
    assert stats.dropped == 2 and stats.spilled == 0 and stats.failed_writes >= 1
    assert ("dropped", 2) in events
    assert not (data_root / "prediction-log").exists()  # nothing spilled


def test_sqlite_keeps_the_newest_shadow_rows_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    backend = SqliteLogBackend(path, shadow_maxlen=3)
    for i in range(5):
        backend.write_shadow([record(i)])
    backend.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        kept = [row[0] for row in db.execute(
            "SELECT request_id FROM shadow_predictions ORDER BY rowid")]
    assert kept == [rid(2), rid(3), rid(4)]


def test_redis_bounds_the_shadow_records_like_the_live_ones(
        request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_server")
    pipeline = f"shadow_{next(_pipelines)}"
    backend = RedisLogBackend(url, pipeline, maxlen=3)
    try:
        for i in range(5):
            backend.write_shadow([record(i, at=T0 + i * dt.timedelta(seconds=1))])
        with contextlib.closing(redis.Redis.from_url(url)) as client:
            issued = [m.decode() for m in client.zrange(f"{pipeline}:shadow:issued", 0, -1)]
            assert issued == [rid(2), rid(3), rid(4)]
            assert not client.exists(shadow_appended_key(pipeline, rid(0)))
            assert client.exists(shadow_appended_key(pipeline, rid(4)))
            assert client.ttl(shadow_appended_key(pipeline, rid(4))) > 0
            assert not client.exists(f"{pipeline}:request:{rid(4)}")  # never issued as live
            assert not client.exists(f"{pipeline}:predictions")
    finally:
        backend.close()
