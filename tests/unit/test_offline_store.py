"""The offline store: partitions, idempotent writes and point-in-time-correct retrieval."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airmlops.features import offline
from airmlops.features.definitions import FEATURE_TIMESTAMP, Entity, FeatureView, OnDemandFeature
from airmlops.features.offline import (
    get_historical_features,
    partition_dates,
    read_view_rows,
    view_dir,
    write_partition,
    write_view_rows,
)

CUSTOMER = Entity(name="customer", join_key="customer_id")
REGION = Entity(name="region", join_key="region_id")
PLAN = FeatureView(name="plan", entity=CUSTOMER, source="profiles", ttl_days=2,
                   columns=["tier", "fee"])
WEATHER = FeatureView(name="weather", entity=REGION, source="profiles", ttl_days=1,
                      columns=["temp"])


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def plan_rows(rows: list[tuple[str, str, str | None, float | None]]) -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": [r[0] for r in rows],
        FEATURE_TIMESTAMP: [ts(r[1]) for r in rows],
        "plan__tier": [r[2] for r in rows],
        "plan__fee": [r[3] for r in rows],
    })


# Customer "a": three profile rows; "b" has one; "c" has none.
TIMELINE = plan_rows([
    ("a", "2026-01-01 10:00", "basic", 10.0),
    ("a", "2026-01-02 10:00", "standard", 20.0),
    ("a", "2026-01-05 10:00", "premium", None),
    ("b", "2026-01-02 10:00", "basic", 11.0),
])

# (customer, query time, expected tier, expected fee): ttl is 2 days.
CASES = [
    ("a", "2026-01-01 09:59:59.999999", None, None),  # before the first row: never the future
    ("a", "2026-01-01 10:00", "basic", 10.0),  # equal timestamps qualify
    ("a", "2026-01-02 09:59:59.999999", "basic", 10.0),
    ("a", "2026-01-02 10:00", "standard", 20.0),
    ("a", "2026-01-04 09:59:59.999999", "standard", 20.0),  # just inside the TTL
    ("a", "2026-01-04 10:00", None, None),  # exactly ttl old: expired
    ("a", "2026-01-05 10:00", "premium", None),  # a stored null stays null
    ("a", "2026-01-07 10:00", None, None),
    ("b", "2026-01-03 00:00", "basic", 11.0),
    ("c", "2026-01-03 00:00", None, None),  # no feature rows at all
]


def entity_frame(cases: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": [c[0] for c in cases],
        "event_timestamp": [pd.Timestamp(c[1]) for c in cases],  # naive = UTC
        "label": range(len(cases)),
    })


def check(result: pd.DataFrame, cases: list[tuple]) -> None:
    for (customer, when, tier, fee), (_, row) in zip(cases, result.iterrows(), strict=True):
        assert row["plan__tier"] == tier, (customer, when)
        if fee is None:
            assert math.isnan(row["plan__fee"]), (customer, when)
        else:
            assert row["plan__fee"] == fee, (customer, when)


def test_layout_and_idempotent_partitions(tmp_path: Path) -> None:
    written = write_view_rows(TIMELINE, PLAN, tmp_path, "churn")
    assert [p.relative_to(tmp_path).parent.as_posix() for p in written] == [
        "features/churn/plan/date=2026-01-01",
        "features/churn/plan/date=2026-01-02",
        "features/churn/plan/date=2026-01-05",
    ]
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in written)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written}

    again = write_view_rows(TIMELINE.sample(frac=1, random_state=1), PLAN, tmp_path, "churn")
    assert again == written  # same rows in any order: the same files, untouched
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in again} == before

    corrected = TIMELINE.assign(plan__fee=TIMELINE["plan__fee"] * 2)
    replaced = write_view_rows(corrected.iloc[[1, 3]], PLAN, tmp_path, "churn")
    folder = view_dir(tmp_path, "churn", PLAN) / "date=2026-01-02"
    assert list(folder.glob("part-*.parquet")) == replaced  # one file per partition
    assert sorted(read_view_rows(PLAN, tmp_path, "churn")["plan__fee"].dropna()) == [
        10.0, 22.0, 40.0]

    # Replacing a range removes the days that have no rows any more.
    write_view_rows(TIMELINE.iloc[[0]], PLAN, tmp_path, "churn",
                    days=[dt.date(2026, 1, 1), dt.date(2026, 1, 2)])
    assert partition_dates(tmp_path, "churn", PLAN) == [dt.date(2026, 1, 1), dt.date(2026, 1, 5)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_partition_refuses_rows_of_another_day_and_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows outside 2026-01-01"):
        write_partition(TIMELINE, PLAN, tmp_path, "churn", dt.date(2026, 1, 1))
    with pytest.raises(ValueError, match="missing key or timestamp"):
        write_view_rows(TIMELINE.assign(customer_id=[None, "a", "a", "b"]), PLAN, tmp_path,
                        "churn")
    with pytest.raises(ValueError, match="does not match"):
        write_view_rows(TIMELINE, PLAN, tmp_path, "../escape")


def test_point_in_time_answers_on_a_hand_built_timeline(tmp_path: Path) -> None:
    write_view_rows(TIMELINE, PLAN, tmp_path, "churn")
    result = get_historical_features(entity_frame(CASES), [PLAN], tmp_path, "churn")
    check(result, CASES)
    assert result["plan__fee"].dtype == np.float64
    assert result["label"].tolist() == list(range(len(CASES)))


def test_every_row_comes_back_in_order_with_its_index(tmp_path: Path) -> None:
    write_view_rows(TIMELINE, PLAN, tmp_path, "churn")
    order = np.random.default_rng(0).permutation(len(CASES))
    cases = [CASES[i] for i in order] * 3  # repeated (entity, time) pairs too
    frame = entity_frame(cases)
    frame.index = [f"r{i}" for i in range(len(frame))]
    frame.loc["r4", "event_timestamp"] = pd.NaT  # an unusable time: nulls, not a dropped row
    result = get_historical_features(frame, [PLAN], tmp_path, "churn")
    assert list(result.index) == list(frame.index)
    pd.testing.assert_frame_equal(result[frame.columns], frame)
    assert result.loc["r4", "plan__tier"] is None
    expected = [c for i, c in enumerate(cases) if i != 4]
    check(result.drop(index="r4"), expected)


def test_late_arriving_partitions_and_corrections(tmp_path: Path) -> None:
    # The newest day is written first, the older ones later: the store orders by time.
    write_view_rows(TIMELINE.iloc[[2]], PLAN, tmp_path, "churn")
    write_view_rows(TIMELINE.iloc[[0, 1, 3]], PLAN, tmp_path, "churn")
    check(get_historical_features(entity_frame(CASES), [PLAN], tmp_path, "churn"), CASES)
    # A corrected day replaces the old values.
    write_view_rows(plan_rows([("a", "2026-01-02 10:00", "standard", 25.0),
                               ("b", "2026-01-02 10:00", "basic", 11.0)]), PLAN, tmp_path,
                    "churn")
    fixed = [(c, w, t, 25.0 if f == 20.0 else f) for c, w, t, f in CASES]
    check(get_historical_features(entity_frame(CASES), [PLAN], tmp_path, "churn"), fixed)


def test_equal_timestamps_in_the_input_keep_the_last_row(tmp_path: Path) -> None:
    rows = plan_rows([("a", "2026-01-01 10:00", "basic", 1.0),
                      ("a", "2026-01-01 10:00", "premium", 2.0)])
    write_view_rows(rows, PLAN, tmp_path, "churn")
    stored = read_view_rows(PLAN, tmp_path, "churn")
    assert stored["plan__tier"].tolist() == ["premium"]


def test_views_of_different_entities_and_on_demand_features(tmp_path: Path) -> None:
    write_view_rows(TIMELINE, PLAN, tmp_path, "churn")
    weather = pd.DataFrame({
        "region_id": [1, 1, 2],
        FEATURE_TIMESTAMP: [ts("2026-01-01"), ts("2026-01-02"), ts("2026-01-02")],
        "weather__temp": [3.5, 4.5, -1.0],
    })
    write_view_rows(weather, WEATHER, tmp_path, "churn")
    frame = pd.DataFrame({
        "customer_id": ["a", "b", "a"],
        "region_id": [1, 2, 3],
        "event_timestamp": [ts("2026-01-02 12:00"), ts("2026-01-02 12:00"),
                            ts("2026-01-02 12:00")],
        "minutes": [40.0, 0.0, 5.0],
    })
    per_fee = OnDemandFeature(name="minutes_per_fee", function="minutes_per_session",
                              inputs=["minutes", "plan__fee"])
    result = get_historical_features(frame, [PLAN, WEATHER], tmp_path, "churn",
                                     on_demand=[per_fee])
    assert result["weather__temp"].tolist()[:2] == [4.5, -1.0]
    assert math.isnan(result["weather__temp"].iloc[2])
    assert result["minutes_per_fee"].tolist() == [2.0, 0.0, 0.25]
    with pytest.raises(ValueError, match="already has feature column"):
        get_historical_features(result, [PLAN], tmp_path, "churn")
    with pytest.raises(ValueError, match="no join key 'region_id'"):
        get_historical_features(frame.drop(columns="region_id"), [WEATHER], tmp_path, "churn")


def test_only_the_partitions_in_reach_are_read(tmp_path: Path, monkeypatch) -> None:
    days = pd.date_range("2026-01-01", "2026-01-20", freq="D", tz="UTC")
    rows = pd.DataFrame({"customer_id": "a", FEATURE_TIMESTAMP: days + pd.Timedelta(hours=1),
                         "plan__tier": "basic", "plan__fee": np.arange(len(days), dtype=float)})
    write_view_rows(rows, PLAN, tmp_path, "churn")
    seen: list[str] = []
    real = offline.read_partition_file

    def spy(path: Path, columns: list[str]):
        seen.append(path.parent.name)
        return real(path, columns)

    monkeypatch.setattr(offline, "read_partition_file", spy)
    frame = pd.DataFrame({"customer_id": ["a", "a"],
                          "event_timestamp": [ts("2026-01-10 12:00"), ts("2026-01-12 00:30")]})
    result = get_historical_features(frame, [PLAN], tmp_path, "churn")
    assert result["plan__fee"].tolist() == [9.0, 10.0]
    # min time - ttl (2 days) .. max time: 2026-01-08 .. 2026-01-12
    assert sorted(set(seen)) == [f"date=2026-01-{d:02d}" for d in range(8, 13)]


def brute_force(frame: pd.DataFrame, stored: pd.DataFrame, view: FeatureView,
                key: str) -> list[float]:
    out = []
    ttl = pd.Timedelta(days=view.ttl_days)
    for entity, when in zip(frame[key], frame["event_timestamp"], strict=True):
        rows = stored[(stored[key] == entity) & (stored[FEATURE_TIMESTAMP] <= when)
                      & (stored[FEATURE_TIMESTAMP] > when - ttl)]
        out.append(rows.sort_values(FEATURE_TIMESTAMP)["plan__fee"].iloc[-1]
                   if len(rows) else np.nan)
    return out


@pytest.mark.parametrize("keys", ["int", "str"])
def test_matches_brute_force_on_random_data(tmp_path: Path, keys: str) -> None:
    rng = np.random.default_rng(11)
    n = 400
    stored = pd.DataFrame({
        "customer_id": rng.integers(0, 30, n),
        FEATURE_TIMESTAMP: ts("2026-03-01") + pd.to_timedelta(rng.integers(0, 10 * 86400, n),
                                                               unit="s"),
        "plan__tier": "basic",
        "plan__fee": rng.normal(size=n),
    }).drop_duplicates(["customer_id", FEATURE_TIMESTAMP])
    frame = pd.DataFrame({
        "customer_id": rng.integers(0, 35, 300),
        "event_timestamp": ts("2026-02-28") + pd.to_timedelta(rng.integers(0, 13 * 86400, 300),
                                                              unit="s"),
    })
    if keys == "str":
        stored["customer_id"] = "c" + stored["customer_id"].astype(str)
        frame["customer_id"] = "c" + frame["customer_id"].astype(str)
    write_view_rows(stored, PLAN, tmp_path, "churn")
    result = get_historical_features(frame, [PLAN], tmp_path, "churn")
    np.testing.assert_array_equal(result["plan__fee"].to_numpy(),
                                  brute_force(frame, stored, PLAN, "customer_id"))


def test_very_long_spans_take_the_exact_fallback_path(tmp_path: Path) -> None:
    # Keys spread over 1,000 values x a 260-year span overflow the packed (entity, time) key:
    # the join then ranks the times instead. The answers must not change.
    forever = FeatureView(name="plan", entity=CUSTOMER, source="profiles", ttl_days=36_500,
                          columns=["tier", "fee"])
    rng = np.random.default_rng(5)
    days = ts("1950-01-01") + pd.to_timedelta(np.sort(rng.choice(36_000, 12, replace=False)),
                                              unit="D")
    stored = pd.DataFrame({
        "customer_id": rng.integers(0, 1000, 300),
        FEATURE_TIMESTAMP: days[rng.integers(0, 12, 300)]
        + pd.to_timedelta(rng.integers(0, 86_400, 300), unit="s"),
        "plan__tier": "basic",
        "plan__fee": np.arange(300, dtype=float),
    }).drop_duplicates(["customer_id", FEATURE_TIMESTAMP])
    stored = pd.concat([stored, stored.assign(customer_id=stored["customer_id"] % 40)])
    stored = stored.drop_duplicates(["customer_id", FEATURE_TIMESTAMP])
    write_view_rows(stored, forever, tmp_path, "churn")
    frame = pd.DataFrame({
        "customer_id": [0, 999, *rng.integers(0, 40, 198)],
        "event_timestamp": ts("1950-01-01") + pd.to_timedelta(rng.integers(0, 60_000, 200),
                                                              unit="D"),
    })
    exact = stored.sample(50, random_state=1)  # queries at exactly a stored row's time
    frame = pd.concat([frame, pd.DataFrame({"customer_id": exact["customer_id"],
                                            "event_timestamp": exact[FEATURE_TIMESTAMP]})],
                      ignore_index=True)
    result = get_historical_features(frame, [forever], tmp_path, "churn")
    np.testing.assert_array_equal(result["plan__fee"].to_numpy(),
                                  brute_force(frame, stored, forever, "customer_id"))
    assert result["plan__fee"].notna().sum() > 100


def test_an_empty_store_gives_nulls_for_every_row(tmp_path: Path) -> None:
    frame = entity_frame(CASES)
    result = get_historical_features(frame, [PLAN], tmp_path, "churn")
    assert len(result) == len(frame)
    assert result["plan__fee"].isna().all() and result["plan__tier"].isna().all()
