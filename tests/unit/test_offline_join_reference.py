"""The point-in-time join against a plain row-by-row reference on random data: text features
with missing values, text stored as a dictionary in some partitions, a feature added later,
ttl edges, unknown keys, missing times and a shuffled, repeated index."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airmlops.features.definitions import FEATURE_TIMESTAMP, Entity, FeatureView
from airmlops.features.offline import get_historical_features, write_partition, write_view_rows

CUSTOMER = Entity(name="customer", join_key="customer_id")
PLAN = FeatureView(name="plan", entity=CUSTOMER, source="profiles", ttl_days=2,
                   columns=["tier", "fee", "seats"])
OLD_PLAN = FeatureView(name="plan", entity=CUSTOMER, source="profiles", ttl_days=2,
                       columns=["tier", "fee"])  # before "seats" was added
START = pd.Timestamp("2026-03-01", tz="UTC")
TIERS = np.array(["basic", "standard", "premium", None], dtype=object)


def stored_rows(rng: np.random.Generator, n: int) -> pd.DataFrame:
    rows = pd.DataFrame({
        "customer_id": rng.integers(0, 40, n),
        FEATURE_TIMESTAMP: START + pd.to_timedelta(rng.integers(0, 12 * 86_400, n), unit="s"),
        "plan__tier": TIERS[rng.integers(0, len(TIERS), n)],
        "plan__fee": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
        "plan__seats": rng.integers(1, 9, n),
    })
    return rows.drop_duplicates(["customer_id", FEATURE_TIMESTAMP]).reset_index(drop=True)


def write_store(stored: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Days 0-3 without "seats", day 5 with "tier" as a dictionary (categorical), the rest
    plain; returns the rows as a reader should see them (no "seats" on days 0-3)."""
    day = (stored[FEATURE_TIMESTAMP] - START).dt.days
    old = day <= 3
    write_view_rows(stored[old].drop(columns="plan__seats"), OLD_PLAN, root, "churn")
    write_view_rows(stored[~old & (day != 5)], PLAN, root, "churn")
    fifth = stored[day == 5].assign(plan__tier=lambda f: f["plan__tier"].astype("category"))
    write_partition(fifth, PLAN, root, "churn", (START + pd.Timedelta(days=5)).date())
    return stored.assign(plan__seats=stored["plan__seats"].where(~old))


def entity_rows(rng: np.random.Generator, stored: pd.DataFrame, n: int) -> pd.DataFrame:
    frame = pd.DataFrame({
        "customer_id": rng.integers(0, 45, n),  # 40..44 have no feature rows
        "event_timestamp": START + pd.to_timedelta(rng.integers(-86_400, 14 * 86_400, n),
                                                   unit="s"),
        "label": rng.integers(0, 2, n),
    })
    exact = stored.sample(40, random_state=3)  # at a stored time, and exactly one ttl later
    edges = pd.DataFrame({
        "customer_id": np.concatenate([exact["customer_id"]] * 3),
        "event_timestamp": pd.concat([
            exact[FEATURE_TIMESTAMP],
            exact[FEATURE_TIMESTAMP] + pd.Timedelta(days=PLAN.ttl_days),
            exact[FEATURE_TIMESTAMP] + pd.Timedelta(days=PLAN.ttl_days, microseconds=-1),
        ]).to_numpy(),
        "label": 0,
    })
    frame = pd.concat([frame, edges], ignore_index=True)
    frame.loc[[5, 17], "event_timestamp"] = pd.NaT
    frame.index = rng.permutation(len(frame)) % (len(frame) // 2)  # shuffled and repeated
    return frame


def reference(frame: pd.DataFrame, stored: pd.DataFrame, name: str) -> list:
    """Row by row: the newest stored row with ts <= time and ts > time - ttl."""
    ttl = pd.Timedelta(days=PLAN.ttl_days)
    out = []
    for key, when in zip(frame["customer_id"], frame["event_timestamp"], strict=True):
        if pd.isna(when):
            out.append(None)
            continue
        rows = stored[(stored["customer_id"] == key) & (stored[FEATURE_TIMESTAMP] <= when)
                      & (stored[FEATURE_TIMESTAMP] > when - ttl)]
        value = rows.sort_values(FEATURE_TIMESTAMP)[name].iloc[-1] if len(rows) else None
        out.append(None if value is None or (isinstance(value, float) and math.isnan(value))
                   else value)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_join_matches_a_row_by_row_reference(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stored = write_store(stored_rows(rng, 600), tmp_path)
    frame = entity_rows(rng, stored, 500)
    result = get_historical_features(frame, [PLAN], tmp_path, "churn")

    assert list(result.columns) == [*frame.columns, *PLAN.feature_names]
    pd.testing.assert_frame_equal(result[frame.columns], frame)
    assert result["plan__tier"].dtype == object
    assert result["plan__fee"].dtype == np.float64
    assert result["plan__seats"].dtype == np.float64
    assert result["plan__tier"].tolist() == reference(frame, stored, "plan__tier")
    for name in ("plan__fee", "plan__seats"):
        expected = [np.nan if v is None else float(v) for v in reference(frame, stored, name)]
        np.testing.assert_array_equal(result[name].to_numpy(), np.array(expected))
    assert result["plan__tier"].notna().sum() > 50  # the random data does exercise matches


def test_text_missing_everywhere_it_is_chosen_comes_back_as_none(tmp_path: Path) -> None:
    rows = pd.DataFrame({
        "customer_id": [1, 2, 4],
        FEATURE_TIMESTAMP: [START, START, START],
        "plan__tier": [None, None, "basic"],  # customer 4 is never asked for
        "plan__fee": [1.0, 2.0, 3.0],
    })
    write_view_rows(rows, OLD_PLAN, tmp_path, "churn")
    frame = pd.DataFrame({"customer_id": [2, 3, 1],
                          "event_timestamp": [START + pd.Timedelta(hours=1)] * 3})
    result = get_historical_features(frame, [PLAN], tmp_path, "churn")
    assert result["plan__tier"].tolist() == [None, None, None]
    assert result["plan__fee"].tolist()[::2] == [2.0, 1.0]
    assert math.isnan(result["plan__fee"].iloc[1])
    assert result["plan__seats"].isna().all() and result["plan__seats"].dtype == np.float64
