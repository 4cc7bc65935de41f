"""Feature-view rows from raw events: hand-checked values and a brute-force reference."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from airmlops.features.compute import (
    DAY_US,
    compute_view,
    datetime_to_epoch_us,
    epoch_us_to_datetime,
    to_epoch_us,
)
from airmlops.features.definitions import FEATURE_TIMESTAMP, Entity, FeatureView

CUSTOMER = Entity(name="customer", join_key="customer_id")
FUNCTIONS = ("count", "sum", "mean", "min", "max", "last")


def events_view(*aggregations: tuple[str, str, int], ttl_days: int = 5) -> FeatureView:
    return FeatureView(
        name="activity", entity=CUSTOMER, source="events", ttl_days=ttl_days,
        aggregations=[
            {"column": c, "function": f, "window_days": w} for c, f, w in aggregations
        ],
    )


def end_of(day: str) -> pd.Timestamp:
    return pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)


EVENTS = pd.DataFrame({
    "customer_id": [1, 1, 1, 2, 2, 1],
    "event_timestamp": pd.to_datetime([
        "2026-01-01 10:00", "2026-01-01 12:00", "2026-01-03 00:00",
        "2026-01-02 00:00", "2026-01-02 05:00", "2026-01-06 23:59",
    ]),
    "sessions": [1.0, 2.0, np.nan, 5.0, 4.0, 7.0],
    "plan": ["a", "b", None, "c", None, "d"],
})


def test_windows_over_a_hand_built_timeline() -> None:
    view = events_view(*[("sessions", f, w) for f in FUNCTIONS for w in (1, 3)],
                       ("plan", "last", 2))
    rows = compute_view(EVENTS, view, timestamp_column="event_timestamp")
    assert list(rows.columns) == ["customer_id", FEATURE_TIMESTAMP, *view.feature_names]
    assert str(rows[FEATURE_TIMESTAMP].dtype) == "datetime64[us, UTC]"
    by_key = {(r.customer_id, r.event_timestamp): r for r in rows.itertuples(index=False)}
    # Customer 1: day 1 has 1 and 2, day 3 a null, day 6 a 7. The largest window is 3 days:
    # day 3's (null) event keeps a window in reach through day 5, then day 6 has an event.
    assert sorted(d.strftime("%d") for c, d in by_key if c == 1) == ["01", "02", "03", "04",
                                                                      "05", "06"]
    # Customer 2: events on day 2 only -> rows on days 2..5 (day 5: every window empty).
    assert sorted(d.strftime("%d") for c, d in by_key if c == 2) == ["02", "03", "04", "05"]

    day1 = by_key[(1, end_of("2026-01-01"))]
    assert (day1.activity__sessions_count_1d, day1.activity__sessions_sum_1d) == (2, 3.0)
    assert (day1.activity__sessions_mean_1d, day1.activity__sessions_min_1d) == (1.5, 1.0)
    assert (day1.activity__sessions_max_1d, day1.activity__sessions_last_1d) == (2.0, 2.0)
    assert day1.activity__plan_last_2d == "b"  # the newest of the day, by time

    day3 = by_key[(1, end_of("2026-01-03"))]
    assert day3.activity__sessions_count_1d == 0  # the day's only value is null
    assert day3.activity__sessions_sum_1d == 0.0
    assert math.isnan(day3.activity__sessions_mean_1d)
    assert math.isnan(day3.activity__sessions_last_1d)
    assert (day3.activity__sessions_count_3d, day3.activity__sessions_sum_3d) == (2, 3.0)
    assert day3.activity__sessions_last_3d == 2.0
    assert day3.activity__plan_last_2d is None  # days 2-3 hold no plan value

    day4 = by_key[(1, end_of("2026-01-04"))]
    assert day4.activity__sessions_count_3d == 0 and day4.activity__sessions_sum_3d == 0.0
    assert math.isnan(day4.activity__sessions_max_3d)

    empty = by_key[(2, end_of("2026-01-05"))]  # the first day all of customer 2's windows are empty
    assert empty.activity__sessions_count_3d == 0
    assert math.isnan(empty.activity__sessions_mean_3d)
    assert empty.activity__plan_last_2d is None

    day6 = by_key[(1, end_of("2026-01-06"))]
    assert day6.activity__sessions_sum_3d == 7.0 and day6.activity__plan_last_2d == "d"

    stamps = rows[FEATURE_TIMESTAMP].tolist()
    keys = rows["customer_id"].tolist()
    assert list(zip(stamps, keys, strict=True)) == sorted(zip(stamps, keys, strict=True))


def test_a_range_emits_only_its_days_and_uses_the_lookback() -> None:
    view = events_view(("sessions", "sum", 3))
    full = compute_view(EVENTS, view, timestamp_column="event_timestamp")
    part = compute_view(EVENTS, view, timestamp_column="event_timestamp",
                        start=dt.date(2026, 1, 3), end=dt.date(2026, 1, 4))
    assert set(part[FEATURE_TIMESTAMP].dt.date) == {dt.date(2026, 1, 3), dt.date(2026, 1, 4)}
    in_range = full[full[FEATURE_TIMESTAMP].dt.date.between(dt.date(2026, 1, 3),
                                                            dt.date(2026, 1, 4))]
    pd.testing.assert_frame_equal(part.reset_index(drop=True), in_range.reset_index(drop=True))
    # A range with no events in reach gives an empty frame with the right columns.
    none = compute_view(EVENTS, view, timestamp_column="event_timestamp",
                        start=dt.date(2026, 3, 1), end=dt.date(2026, 3, 2))
    assert none.empty and list(none.columns) == list(full.columns)
    with pytest.raises(ValueError, match="before start"):
        compute_view(EVENTS, view, timestamp_column="event_timestamp",
                     start=dt.date(2026, 1, 4), end=dt.date(2026, 1, 3))


def test_time_zones_are_normalised_to_utc() -> None:
    view = events_view(("sessions", "sum", 1))
    shifted = EVENTS.assign(
        event_timestamp=EVENTS["event_timestamp"].dt.tz_localize("UTC").dt.tz_convert(
            "America/New_York")
    )
    pd.testing.assert_frame_equal(
        compute_view(shifted, view, timestamp_column="event_timestamp"),
        compute_view(EVENTS, view, timestamp_column="event_timestamp"),
    )


def test_type_errors_and_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match=r"\['sum'\] of column 'plan' need numbers"):
        compute_view(EVENTS, events_view(("plan", "sum", 2)), timestamp_column="event_timestamp")
    with pytest.raises(ValueError, match=r"no column\(s\) \['minutes'\]"):
        compute_view(EVENTS, events_view(("minutes", "sum", 2)),
                     timestamp_column="event_timestamp")


def reference(events: pd.DataFrame, view: FeatureView, days: list[dt.date]) -> pd.DataFrame:
    """The definition, computed the slow and obvious way."""
    max_window = view.max_window_days
    out = []
    ts = events["event_timestamp"]
    for key, group in events.groupby("customer_id"):
        gts = ts[group.index]
        for day in days:
            day_end = pd.Timestamp(day) + pd.Timedelta(days=1)
            reach = group[(gts >= day_end - pd.Timedelta(days=max_window + 1)) & (gts < day_end)]
            if reach.empty:
                continue
            row = {"customer_id": key, FEATURE_TIMESTAMP: end_of(str(day))}
            windows = {
                w: reach[(gts[reach.index] >= day_end - pd.Timedelta(days=w))]
                .sort_values("event_timestamp")
                for w in {a.window_days for a in view.aggregations}
            }
            for agg in view.aggregations:
                values = windows[agg.window_days][agg.column].dropna()
                name = f"{view.name}__{agg.suffix}"
                if agg.function == "count":
                    row[name] = len(values)
                elif agg.function == "sum":
                    row[name] = float(values.sum())
                elif values.empty:
                    row[name] = np.nan
                elif agg.function == "mean":
                    row[name] = float(values.sum()) / len(values)
                else:
                    row[name] = {"min": values.min, "max": values.max,
                                 "last": lambda v=values: v.iloc[-1]}[agg.function]()
            out.append(row)
    return pd.DataFrame(out)


def test_matches_a_brute_force_reference_on_random_events() -> None:
    rng = np.random.default_rng(3)
    n = 600
    events = pd.DataFrame({
        "customer_id": rng.integers(0, 25, n),
        "event_timestamp": pd.Timestamp("2026-02-01")
        + pd.to_timedelta(rng.integers(0, 20 * 86_400, n), unit="s"),
        "x": np.where(rng.random(n) < 0.15, np.nan, rng.normal(10, 3, n).round(2)),
    })
    view = events_view(*[("x", f, w) for f in FUNCTIONS for w in (1, 4, 9)])
    days = [dt.date(2026, 2, 1) + dt.timedelta(days=i) for i in range(20)]
    got = compute_view(events, view, timestamp_column="event_timestamp",
                       start=days[0], end=days[-1])
    want = reference(events, view, days)
    got = got.sort_values(["customer_id", FEATURE_TIMESTAMP]).reset_index(drop=True)
    want = want.sort_values(["customer_id", FEATURE_TIMESTAMP]).reset_index(drop=True)
    assert len(got) == len(want) > 300
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    assert got[FEATURE_TIMESTAMP].tolist() == want[FEATURE_TIMESTAMP].tolist()
    for name in view.feature_names:
        np.testing.assert_allclose(got[name].astype(float), want[name].astype(float),
                                   rtol=1e-12, equal_nan=True, err_msg=name)


def test_profile_rows_keep_their_own_times() -> None:
    view = FeatureView(name="profile", entity=CUSTOMER, source="profiles", ttl_days=30,
                       columns=["plan"])
    events = pd.concat([EVENTS, EVENTS.iloc[[0]].assign(plan="z")], ignore_index=True)
    rows = compute_view(events, view, timestamp_column="event_timestamp")
    assert list(rows.columns) == ["customer_id", FEATURE_TIMESTAMP, "profile__plan"]
    # The duplicated (customer 1, 2026-01-01 10:00) keeps the later row's value.
    first = rows[(rows.customer_id == 1)
                 & (rows[FEATURE_TIMESTAMP] == pd.Timestamp("2026-01-01 10:00", tz="UTC"))]
    assert first["profile__plan"].tolist() == ["z"]
    assert len(rows) == len(EVENTS)
    assert list(zip(rows.customer_id, rows[FEATURE_TIMESTAMP], strict=True)) == sorted(
        zip(rows.customer_id, rows[FEATURE_TIMESTAMP], strict=True))
    ranged = compute_view(events, view, timestamp_column="event_timestamp",
                          start=dt.date(2026, 1, 2), end=dt.date(2026, 1, 3))
    assert set(ranged[FEATURE_TIMESTAMP].dt.date) == {dt.date(2026, 1, 2), dt.date(2026, 1, 3)}


def test_time_conversions() -> None:
    stamps = to_epoch_us(pd.Series(["2026-01-01T00:00:00Z", "2026-01-01 01:00", None]))
    assert stamps[0] == datetime_to_epoch_us(dt.datetime(2026, 1, 1))
    assert stamps[1] - stamps[0] == 3_600_000_000
    assert stamps[2] == np.iinfo(np.int64).min
    aware = dt.datetime(2026, 1, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert datetime_to_epoch_us(aware) == stamps[0]
    assert epoch_us_to_datetime(stamps[0] + DAY_US) == dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
