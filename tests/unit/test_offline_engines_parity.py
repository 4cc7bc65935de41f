"""The DuckDB engine of the point-in-time join gives exactly the memory engine's answers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airmlops.features.definitions import FEATURE_TIMESTAMP, Entity, FeatureView, OnDemandFeature
from airmlops.features.offline import get_historical_features, write_view_rows
from airmlops.features.offline_duckdb import TEMP_PARTS, get_historical_features_duckdb

CUSTOMER = Entity(name="customer", join_key="customer_id")
REGION = Entity(name="region", join_key="region_id")
PLAN = FeatureView(name="plan", entity=CUSTOMER, source="profiles", ttl_days=2,
                   columns=["tier", "fee", "active"])
USAGE = FeatureView(name="usage", entity=CUSTOMER, source="profiles", ttl_days=5,
                    columns=["sessions"])
WEATHER = FeatureView(name="weather", entity=REGION, source="profiles", ttl_days=1,
                      columns=["temp"])
PER_FEE = OnDemandFeature(name="sessions_per_fee", function="minutes_per_session",
                          inputs=["usage__sessions", "plan__fee"])
START = pd.Timestamp("2026-03-01", tz="UTC")
DAY = pd.Timedelta(days=1)


def random_store(root: Path, rng: np.random.Generator, n: int, customers: int,
                 text_keys: bool = False) -> pd.DataFrame:
    """Three views over ten days; returns the plan rows (for the TTL-edge entity rows)."""
    stamps = START + pd.to_timedelta(rng.integers(0, 10 * 86_400, n), unit="s")
    plan = pd.DataFrame({
        "customer_id": rng.integers(0, customers, n),
        FEATURE_TIMESTAMP: stamps,
        "plan__tier": rng.choice(np.array(["basic", "premium", None], dtype=object), n),
        "plan__fee": np.where(rng.random(n) < 0.1, np.nan, rng.normal(20, 5, n)),
        "plan__active": rng.random(n) < 0.5,
    }).drop_duplicates(["customer_id", FEATURE_TIMESTAMP])
    usage = pd.DataFrame({
        "customer_id": rng.integers(0, customers, n),
        FEATURE_TIMESTAMP: START + pd.to_timedelta(rng.integers(0, 10 * 86_400, n), unit="s"),
        "usage__sessions": rng.integers(0, 9, n),
    }).drop_duplicates(["customer_id", FEATURE_TIMESTAMP])
    weather = pd.DataFrame({
        "region_id": rng.integers(0, 5, n // 10),
        FEATURE_TIMESTAMP: START + pd.to_timedelta(rng.integers(0, 10 * 86_400, n // 10),
                                                   unit="s"),
        "weather__temp": rng.normal(size=n // 10),
    }).drop_duplicates(["region_id", FEATURE_TIMESTAMP])
    if text_keys:
        plan["customer_id"] = "c" + plan["customer_id"].astype(str)
        usage["customer_id"] = "c" + usage["customer_id"].astype(str)
    write_view_rows(plan, PLAN, root, "churn")
    write_view_rows(usage, USAGE, root, "churn")
    write_view_rows(weather, WEATHER, root, "churn")
    return plan


def random_entities(rng: np.random.Generator, plan: pd.DataFrame, n: int,
                    customers: int) -> pd.DataFrame:
    """Random rows plus rows exactly at, just inside and exactly at the TTL of stored rows,
    repeated times, unknown customers, a missing time and a shuffled index."""
    edges = plan.sample(min(len(plan), n // 4), random_state=1)
    ttl = pd.Timedelta(days=PLAN.ttl_days)
    times = pd.concat([
        START - DAY + pd.to_timedelta(rng.integers(0, 13 * 86_400, n), unit="s").to_series(),
        edges[FEATURE_TIMESTAMP],
        edges[FEATURE_TIMESTAMP] + ttl,
        edges[FEATURE_TIMESTAMP] + ttl - pd.Timedelta(microseconds=1),
    ], ignore_index=True)
    unknown = rng.integers(0, customers + 20, n)
    if plan["customer_id"].dtype == object:
        unknown = np.array(["c" + str(k) for k in unknown], dtype=object)
        unknown[5] = None
    keys = np.concatenate([unknown, *[edges["customer_id"]] * 3])
    frame = pd.DataFrame({
        "customer_id": keys,
        "region_id": rng.integers(0, 7, len(keys)),
        "event_timestamp": times.to_numpy(),
        "label": rng.integers(0, 2, len(keys)),
    })
    frame = pd.concat([frame, frame.iloc[:20]], ignore_index=True)  # ties in time
    frame.loc[3, "event_timestamp"] = pd.NaT
    frame.index = rng.permutation(len(frame)) + 1000
    return frame


@pytest.mark.parametrize("keys", ["int", "str"])
def test_both_engines_agree_row_by_row_on_random_data(tmp_path: Path, keys: str) -> None:
    rng = np.random.default_rng(7)
    plan = random_store(tmp_path, rng, 3_000, customers=200, text_keys=keys == "str")
    frame = random_entities(rng, plan, 2_000, customers=200)
    views, on_demand = [PLAN, USAGE, WEATHER], [PER_FEE]
    expected = get_historical_features(frame, views, tmp_path, "churn", on_demand=on_demand)
    got = get_historical_features_duckdb(frame, views, tmp_path, "churn", on_demand=on_demand,
                                         memory_limit_mb=256)
    pd.testing.assert_frame_equal(got, expected)
    assert expected["plan__tier"].dtype == object and expected["plan__active"].dtype == "float64"
    assert expected["plan__fee"].notna().any() and expected["plan__fee"].isna().any()


def temp_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, Path]]:
    """(files in the temporary folder, the folder) of each DuckDB join logged."""
    return [(r.args[2], Path(r.args[3])) for r in caplog.records
            if r.name == "airmlops.features.offline_duckdb" and "temporary folder" in r.msg]


def test_a_join_larger_than_its_memory_limit_spills_under_the_data_root(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    plan = random_store(tmp_path, rng, 200_000, customers=20_000)
    frame = random_entities(rng, plan, 200_000, customers=20_000)
    views = [PLAN, USAGE]
    expected = get_historical_features(frame, views, tmp_path, "churn")
    with caplog.at_level(logging.INFO, logger="airmlops.features.offline_duckdb"):
        roomy = get_historical_features_duckdb(frame, views, tmp_path, "churn",
                                               memory_limit_mb=2_000)
        tight = get_historical_features_duckdb(frame, views, tmp_path, "churn",
                                               memory_limit_mb=16, threads=1)
    pd.testing.assert_frame_equal(roomy, expected)
    pd.testing.assert_frame_equal(tight, expected)
    (roomy_files, _), (tight_files, folder) = temp_records(caplog)
    assert roomy_files == 0  # within its limit nothing goes to disk
    assert tight_files > 0  # 16 MB: DuckDB opened its temporary folder to spill
    assert folder.is_relative_to(tmp_path / Path(*TEMP_PARTS))
    assert not folder.exists()  # removed after the join
