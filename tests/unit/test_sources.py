"""Batch sources: simulator (label delay), files (CSV/Parquet globs) and SQL (bound params)."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from airmlops.data.simulator import simulate_observations
from airmlops.data.sources import SourceError, bind_interval_parameters, load_batch
from airmlops.settings import PROJECT_ROOT
from airmlops.spec import PipelineSpec, SpecError, parse_spec

UTC = dt.UTC
JAN1 = dt.datetime(2026, 1, 1, tzinfo=UTC)


def make_spec(source: dict[str, Any], data_roots: list[Path] | None = None) -> PipelineSpec:
    data = yaml.safe_load((PROJECT_ROOT / "include/pipelines/churn.yaml").read_text())
    data["source"] = source
    data.pop("feature_store")  # views over events need the simulator or events files
    return parse_spec(data, data_roots=data_roots)


SIMULATOR = make_spec({"kind": "simulator", "seed": 7, "customers": 500,
                       "label_delay_days": 30})


def at(day: int, hour: int = 0) -> dt.datetime:
    return JAN1 + dt.timedelta(days=day, hours=hour)


# --- simulator -------------------------------------------------------------------------------


def test_simulator_batch_holds_only_rows_whose_label_has_arrived() -> None:
    batch = load_batch(SIMULATOR, at(0), at(60))
    cutoff = pd.Timestamp(at(30))
    assert not batch.empty
    assert batch["event_timestamp"].min() >= pd.Timestamp(at(0))
    assert batch["event_timestamp"].max() <= cutoff
    expected = simulate_observations(SIMULATOR.source, JAN1.date(), at(30).date())
    pd.testing.assert_frame_equal(batch, expected)
    # a daily interval ends before any of its labels can arrive
    assert load_batch(SIMULATOR, at(59), at(60)).empty
    assert list(load_batch(SIMULATOR, at(59), at(60)).columns) == list(batch.columns)


def test_simulator_batch_without_label_delay_is_the_half_open_interval() -> None:
    spec = make_spec({"kind": "simulator", "seed": 7, "customers": 500, "label_delay_days": 0})
    batch = load_batch(spec, at(2, hour=12), at(5, hour=6))
    assert batch["event_timestamp"].min() >= pd.Timestamp(at(2, hour=12))
    assert batch["event_timestamp"].max() < pd.Timestamp(at(5, hour=6))
    whole = simulate_observations(spec.source, at(2).date(), at(6).date())
    inside = whole[(whole["event_timestamp"] >= pd.Timestamp(at(2, hour=12)))
                   & (whole["event_timestamp"] < pd.Timestamp(at(5, hour=6)))]
    pd.testing.assert_frame_equal(batch, inside.reset_index(drop=True))
    # a non-UTC interval means the same instants
    tokyo = dt.timezone(dt.timedelta(hours=9))
    same = load_batch(spec, at(2, hour=12).astimezone(tokyo), at(5, hour=6).astimezone(tokyo))
    pd.testing.assert_frame_equal(batch, same)


def test_simulator_scenario_override_and_bad_intervals() -> None:
    drifted = load_batch(SIMULATOR, at(0), at(60), scenario="data_quality")
    assert "monthly_charge" in drifted.columns and "monthly_fee" not in drifted.columns
    with pytest.raises(ValueError, match="timezone-aware"):
        load_batch(SIMULATOR, dt.datetime(2026, 1, 1), at(2))
    with pytest.raises(ValueError, match="before start"):
        load_batch(SIMULATOR, at(2), at(1))


# --- files -----------------------------------------------------------------------------------


@pytest.fixture
def raw_frame() -> pd.DataFrame:
    spec = make_spec({"kind": "simulator", "seed": 3, "customers": 300, "label_delay_days": 0})
    return load_batch(spec, at(0), at(6))


def write_daily_files(frame: pd.DataFrame, folder: Path, suffix: str) -> None:
    folder.mkdir(parents=True)
    for day, part in frame.groupby(frame["event_timestamp"].dt.date):
        path = folder / f"part-{day:%Y%m%d}{suffix}"
        if suffix == ".parquet":
            part.to_parquet(path, index=False)
        else:
            part.to_csv(path, index=False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_glob_under_the_data_root(tmp_path: Path, raw_frame: pd.DataFrame,
                                       suffix: str) -> None:
    write_daily_files(raw_frame, tmp_path / "raw" / "churn", suffix)
    spec = make_spec({"kind": "file", "path": f"raw/churn/part-*{suffix}"})
    batch = load_batch(spec, at(1), at(4), data_root=tmp_path)
    assert str(batch["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    expected = raw_frame[(raw_frame["event_timestamp"] >= pd.Timestamp(at(1)))
                         & (raw_frame["event_timestamp"] < pd.Timestamp(at(4)))]
    pd.testing.assert_frame_equal(batch, expected.reset_index(drop=True))
    # an absolute path (or glob) is allowed when it lies under the data root
    absolute = make_spec({"kind": "file", "path": str(tmp_path / f"raw/churn/*{suffix}")},
                         data_roots=[tmp_path])
    pd.testing.assert_frame_equal(load_batch(absolute, at(1), at(4), data_root=tmp_path), batch)
    with pytest.raises(SourceError, match=r"^source\.path: .* is outside the data root '/x'"):
        load_batch(absolute, at(1), at(4), data_root=Path("/x"))


def test_csv_timestamps_with_offsets_or_none_are_read_as_utc(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(
        "customer_id,event_timestamp,churned\n"
        "C1,2026-01-01T10:00:00+02:00,0\n"  # 08:00 UTC
        "C2,2026-01-01 09:30:00,1\n"  # naive: UTC
        "C3,2026-01-02T00:00:00Z,0\n"
        "C4,2026-01-01T23:30:00-01:00,0\n"  # 00:30 UTC the next day
        "C5,2026-01-01,1\n"  # a date: midnight UTC
        "C6,2026-01-01T10:00,1\n"  # naive after an offset: still UTC
    )
    spec = make_spec({"kind": "file", "path": "events.csv"})
    batch = load_batch(spec, at(0, hour=8), at(1), data_root=tmp_path)
    assert batch["customer_id"].tolist() == ["C1", "C2", "C6"]
    everything = load_batch(spec, at(-1), at(2), data_root=tmp_path)
    assert everything.set_index("customer_id")["event_timestamp"].astype(str).to_dict() == {
        "C1": "2026-01-01 08:00:00+00:00", "C2": "2026-01-01 09:30:00+00:00",
        "C3": "2026-01-02 00:00:00+00:00", "C4": "2026-01-02 00:30:00+00:00",
        "C5": "2026-01-01 00:00:00+00:00", "C6": "2026-01-01 10:00:00+00:00",
    }
    assert batch["event_timestamp"].tolist() == [pd.Timestamp("2026-01-01 08:00", tz="UTC"),
                                                 pd.Timestamp("2026-01-01 09:30", tz="UTC"),
                                                 pd.Timestamp("2026-01-01 10:00", tz="UTC")]


def test_file_errors_name_the_spec_field(tmp_path: Path) -> None:
    nothing = make_spec({"kind": "file", "path": "raw/*.csv"})
    with pytest.raises(SourceError, match=r"^source\.path: no file matches 'raw/\*\.csv'"):
        load_batch(nothing, at(0), at(1), data_root=tmp_path)

    (tmp_path / "bad.csv").write_text("customer_id,ts\nC1,2026-01-01\n")
    no_timestamp = make_spec({"kind": "file", "path": "bad.csv"})
    with pytest.raises(SourceError, match=r"^timestamp: column 'event_timestamp' is not in"):
        load_batch(no_timestamp, at(0), at(1), data_root=tmp_path)

    (tmp_path / "junk.csv").write_text("customer_id,event_timestamp\nC1,yesterday\n")
    junk = make_spec({"kind": "file", "path": "junk.csv"})
    with pytest.raises(SourceError, match=r"^timestamp: .* not ISO 8601"):
        load_batch(junk, at(0), at(1), data_root=tmp_path)

    (tmp_path / "data.dat").write_text("customer_id,event_timestamp\nC1,2026-01-01\n")
    unknown = make_spec({"kind": "file", "path": "data.dat"})
    with pytest.raises(SourceError, match=r"^source\.format: cannot tell"):
        load_batch(unknown, at(0), at(1), data_root=tmp_path)
    declared = make_spec({"kind": "file", "path": "data.dat", "format": "csv"})
    assert len(load_batch(declared, at(0), at(1), data_root=tmp_path)) == 1


def test_relative_file_paths_cannot_leave_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.csv").write_text("TOPSECRET_COLUMN,event_timestamp\nC1,2026-01-01\n")
    (root / "link").symlink_to(outside)
    spec = make_spec({"kind": "file", "path": "link/*.csv"}, data_roots=[tmp_path / "elsewhere"])
    with pytest.raises(SourceError, match=r"^source\.path: .*is outside the data root") as error:
        load_batch(spec, at(0), at(1), data_root=root)
    assert "TOPSECRET" not in str(error.value)
    (root / "inner").mkdir()
    (root / "inner" / "evil.csv").symlink_to(outside / "secret.csv")
    spec = make_spec({"kind": "file", "path": "inner/*.csv"}, data_roots=[tmp_path / "elsewhere"])
    with pytest.raises(SourceError, match=r"^source\.path: .*leads outside the data root") as error:
        load_batch(spec, at(0), at(1), data_root=root)
    assert "TOPSECRET" not in str(error.value)
    absolute = make_spec({"kind": "file", "path": str(outside / "secret.csv")},
                         data_roots=[outside])
    with pytest.raises(SourceError, match=r"^source\.path: .*is outside the data root"):
        load_batch(absolute, at(0), at(1), data_root=root)
    with pytest.raises(SpecError, match=r"'\.\.'"):  # the spec rejects it first too
        parse_spec({**make_spec({"kind": "simulator"}).model_dump(mode="json"),
                    "source": {"kind": "file", "path": "../outside/secret.csv"}})


def test_allowed_data_roots_extend_where_files_may_be_read(tmp_path: Path, monkeypatch) -> None:
    from airmlops.settings import get_settings

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "rows.csv").write_text("customer_id,event_timestamp\nC1,2026-01-01\n")
    spec = make_spec({"kind": "file", "path": str(shared / "*.csv")}, data_roots=[shared])
    with pytest.raises(SourceError, match="is outside the data root"):
        load_batch(spec, at(0), at(1), data_root=tmp_path / "root")
    monkeypatch.setenv("MLOPS_ALLOWED_DATA_ROOTS", f'["{shared}"]')
    get_settings.cache_clear()
    try:
        assert get_settings().data_roots[1:] == (shared,)
        assert len(load_batch(spec, at(0), at(1), data_root=tmp_path / "root")) == 1
    finally:
        get_settings.cache_clear()


def test_scenario_is_for_simulator_sources_only(tmp_path: Path) -> None:
    spec = make_spec({"kind": "file", "path": "x.csv"})
    with pytest.raises(ValueError, match="simulator sources only"):
        load_batch(spec, at(0), at(1), scenario="stable", data_root=tmp_path)


# --- SQL -------------------------------------------------------------------------------------


@pytest.fixture
def database(tmp_path: Path, raw_frame: pd.DataFrame) -> Path:
    path = tmp_path / "warehouse.db"
    with sqlite3.connect(path) as connection:
        raw_frame.to_sql("observations", connection, index=False)
    return path


def expected_rows(raw_frame: pd.DataFrame, start: dt.datetime,
                  end: dt.datetime) -> pd.DataFrame:
    stamps = raw_frame["event_timestamp"]
    inside = raw_frame[(stamps >= pd.Timestamp(start)) & (stamps < pd.Timestamp(end))]
    return inside.reset_index(drop=True)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM observations WHERE event_timestamp >= :start AND event_timestamp < :end"
        " ORDER BY event_timestamp, customer_id",
        "SELECT * FROM observations WHERE event_timestamp >= %(start)s"
        " AND event_timestamp < %(end)s AND plan LIKE '%%' ORDER BY event_timestamp, customer_id",
    ],
)
def test_sql_source_binds_the_interval_on_sqlite(database: Path, raw_frame: pd.DataFrame,
                                                 query: str) -> None:
    spec = make_spec({"kind": "sql", "conn_id": "warehouse", "query": query})
    opened: list[sqlite3.Connection] = []

    def connect(conn_id: str) -> sqlite3.Connection:
        assert conn_id == "warehouse"
        opened.append(sqlite3.connect(database))
        return opened[-1]

    batch = load_batch(spec, at(1, hour=6), at(3), connection_getter=connect)
    expected = expected_rows(raw_frame, at(1, hour=6), at(3))
    assert len(batch) == len(expected) > 0
    assert str(batch["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    pd.testing.assert_frame_equal(batch, expected)
    with pytest.raises(sqlite3.ProgrammingError):  # the connection was closed after use
        opened[0].execute("SELECT 1")


def test_sql_source_through_sqlalchemy(database: Path, raw_frame: pd.DataFrame) -> None:
    from sqlalchemy import create_engine

    query = ("SELECT * FROM observations WHERE event_timestamp >= %(start)s"
             " AND event_timestamp < %(end)s ORDER BY event_timestamp, customer_id")
    spec = make_spec({"kind": "sql", "conn_id": "warehouse", "query": query})
    engine = create_engine(f"sqlite:///{database}")
    try:
        from_connection = load_batch(spec, at(0), at(2),
                                     connection_getter=lambda _: engine.connect())
        from_engine = load_batch(spec, at(0), at(2), connection_getter=lambda _: engine)
    finally:
        engine.dispose()
    expected = expected_rows(raw_frame, at(0), at(2))
    pd.testing.assert_frame_equal(from_connection, expected)
    pd.testing.assert_frame_equal(from_engine, expected)


def test_sql_values_never_enter_the_query_text() -> None:
    start, end = "x'; DROP TABLE t; --", object()
    sql, params = bind_interval_parameters(
        "SELECT * FROM t WHERE ts >= :start AND ts < :end AND name LIKE 'a%'", "pyformat",
        start, end)
    assert sql == "SELECT * FROM t WHERE ts >= %(start)s AND ts < %(end)s AND name LIKE 'a%%'"
    assert params == {"start": start, "end": end}

    query = "SELECT a::int FROM t WHERE ts < %(end)s AND ts >= %(start)s AND n LIKE 'a%%'"
    assert bind_interval_parameters(query, "named", 1, 2) == (
        "SELECT a::int FROM t WHERE ts < :end AND ts >= :start AND n LIKE 'a%'",
        {"start": 1, "end": 2},
    )
    assert bind_interval_parameters(query, "qmark", 1, 2) == (
        "SELECT a::int FROM t WHERE ts < ? AND ts >= ? AND n LIKE 'a%'", [2, 1])
    assert bind_interval_parameters(query, "format", 1, 2) == (
        "SELECT a::int FROM t WHERE ts < %s AND ts >= %s AND n LIKE 'a%%'", [2, 1])
    assert bind_interval_parameters(query, "numeric", 1, 2)[0] == (
        "SELECT a::int FROM t WHERE ts < :1 AND ts >= :2 AND n LIKE 'a%'")
    with pytest.raises(SourceError, match="not both"):
        bind_interval_parameters("WHERE a >= :start AND a < %(end)s", "named", 1, 2)


def test_default_connection_comes_from_the_airflow_connection(
    database: Path, raw_frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", "postgresql://user:secret@127.0.0.1:1/dw")
    seen: list[str | None] = []

    def fake_get_conn(hook: PostgresHook) -> sqlite3.Connection:
        seen.append(hook.get_conn_id())
        return sqlite3.connect(database)  # stands in for the driver's connection

    monkeypatch.setattr(PostgresHook, "get_conn", fake_get_conn)
    query = ("SELECT * FROM observations WHERE event_timestamp >= :start"
             " AND event_timestamp < :end ORDER BY event_timestamp, customer_id")
    spec = make_spec({"kind": "sql", "conn_id": "warehouse", "query": query})
    batch = load_batch(spec, at(0), at(1))
    assert seen == ["warehouse"]
    pd.testing.assert_frame_equal(batch, expected_rows(raw_frame, at(0), at(1)))

    monkeypatch.setenv("AIRFLOW_CONN_NOT_SQL", "unknowntype://host")
    spec = make_spec({"kind": "sql", "conn_id": "not_sql", "query": query})
    with pytest.raises(SourceError, match=r"^source\.conn_id: cannot use Airflow connection"):
        load_batch(spec, at(0), at(1))
