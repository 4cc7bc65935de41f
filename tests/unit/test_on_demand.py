"""On-demand features: the DataFrame path (training) and the row path (serving) agree exactly."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from airmlops.features.definitions import OnDemandFeature
from airmlops.features.on_demand import apply_on_demand
from airmlops.features.on_demand_library import REGISTRY, get_function


def same(a: object, b: object) -> bool:
    """Exact equality where a missing value (None or NaN) equals a missing value."""
    missing_a = a is None or (isinstance(a, float) and math.isnan(a))
    missing_b = b is None or (isinstance(b, float) and math.isnan(b))
    if missing_a or missing_b:
        return missing_a and missing_b
    return a == b and type(a) is type(b)


def numeric_inputs(rng: np.random.Generator, n: int) -> list[object]:
    """Numbers with the awkward cases mixed in: zeros, negatives, None, NaN, ints, strings."""
    values: list[object] = list(np.round(rng.normal(5, 5, n), 3))
    for i in range(0, n, 7):
        values[i] = 0.0
    for i in range(3, n, 11):
        values[i] = None
    for i in range(5, n, 13):
        values[i] = float("nan")
    for i in range(6, n, 17):
        values[i] = int(rng.integers(-3, 4))
    values[1] = "12"  # text is not a number, in both paths
    return values


def timestamp_inputs(rng: np.random.Generator, n: int) -> list[object]:
    base = dt.datetime(2026, 1, 1)
    values: list[object] = [
        base + dt.timedelta(hours=int(h)) for h in rng.integers(0, 24 * 21, n)
    ]
    for i in range(0, n, 5):
        values[i] = values[i].replace(tzinfo=dt.timezone(dt.timedelta(hours=-9)))
    for i in range(2, n, 9):
        values[i] = values[i].isoformat()
    for i in range(4, n, 10):
        values[i] = None
    values[1] = "not a time"
    return values


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_function_gives_the_same_values_on_both_paths(name: str) -> None:
    function = get_function(name)
    rng = np.random.default_rng(len(name))
    n = 300
    columns = {}
    for position, kind in enumerate(function.input_kinds):
        make = timestamp_inputs if kind == "timestamp" else numeric_inputs
        columns[f"in{position}"] = make(rng, n)
    feature = OnDemandFeature(
        name="out", function=name, inputs=list(columns), type=function.output_type
    )
    frame = pd.DataFrame({key: pd.Series(values, dtype=object) for key, values in columns.items()})
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(),
                                                                       strict=True)]

    batch = apply_on_demand(frame, [feature])["out"].tolist()
    online = [row["out"] for row in apply_on_demand(rows, [feature])]

    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(batch, online, strict=True))
                  if not same(a, b)]
    assert not mismatches, mismatches[:5]
    assert any(v is not None for v in online), "the inputs never produced a value"
    assert any(v is None for v in online), "the inputs never produced a missing value"


def test_typed_columns_agree_with_rows_too() -> None:
    """Training frames have float64/int64 columns (not object): same values as the rows."""
    feature = OnDemandFeature(name="mps", function="minutes_per_session",
                              inputs=["minutes", "sessions"])
    frame = pd.DataFrame({"minutes": [90.0, 10.0, np.nan, 7.5, 0.0],
                          "sessions": [3, 0, 2, 2, 0]})
    batch = apply_on_demand(frame, [feature])["mps"]
    assert batch.dtype == np.float64
    online = apply_on_demand(frame.to_dict(orient="records"), [feature])
    assert batch.tolist()[:1] == [30.0] and math.isnan(batch[1]) and math.isnan(batch[2])
    assert [r["mps"] for r in online] == [30.0, None, None, 3.75, None]


def test_known_values() -> None:
    features = [
        OnDemandFeature(name="mps", function="minutes_per_session", inputs=["m", "s"]),
        OnDemandFeature(name="fpm", function="fee_per_minute", inputs=["fee", "m"]),
        OnDemandFeature(name="weekend", function="is_weekend_request", inputs=["t"]),
        OnDemandFeature(name="failed", function="share", inputs=["bad", "all"]),
    ]
    row = {"m": 120.0, "s": 4, "fee": 15.0, "t": "2026-01-03T10:00:00", "bad": 3, "all": 2}
    out = apply_on_demand(row, features)
    assert out == {**row, "mps": 30.0, "fpm": 0.125, "weekend": 1.0, "failed": 1.0}
    monday = apply_on_demand({**row, "t": dt.datetime(2026, 1, 5, 9)}, features)
    assert monday["weekend"] == 0.0
    # Sunday 20:00 UTC, although Monday 01:00 at +05:00: the rule is in UTC on both paths.
    aware = "2026-01-05T01:00:00+05:00"
    assert apply_on_demand({**row, "t": aware}, features)["weekend"] == 1.0
    frame = apply_on_demand(pd.DataFrame([{**row, "t": aware}]), features)
    assert frame["weekend"].tolist() == [1.0]


def test_features_chain_in_declaration_order() -> None:
    features = [
        OnDemandFeature(name="mps", function="minutes_per_session", inputs=["m", "s"]),
        OnDemandFeature(name="per_fee", function="fee_per_minute", inputs=["mps", "fee"]),
    ]
    rows = [{"m": 60.0, "s": 2, "fee": 10.0}, {"m": 60.0, "s": 0, "fee": 10.0}]
    online = apply_on_demand(rows, features)
    assert [r["per_fee"] for r in online] == [3.0, None]
    batch = apply_on_demand(pd.DataFrame(rows), features)
    assert batch["per_fee"].iloc[0] == 3.0 and math.isnan(batch["per_fee"].iloc[1])


def test_missing_inputs_are_missing_values_not_errors() -> None:
    feature = OnDemandFeature(name="mps", function="minutes_per_session", inputs=["m", "s"])
    assert apply_on_demand({"m": 3.0}, [feature])["mps"] is None
    batch = apply_on_demand(pd.DataFrame({"m": [3.0, 4.0]}), [feature])
    assert batch["mps"].isna().all()


def test_inputs_are_left_untouched_and_kinds_are_kept() -> None:
    feature = OnDemandFeature(name="mps", function="minutes_per_session", inputs=["m", "s"])
    row = {"m": 3.0, "s": 1}
    rows = [row]
    frame = pd.DataFrame(rows, index=["a"])
    assert isinstance(apply_on_demand(row, [feature]), dict)
    assert isinstance(apply_on_demand(rows, [feature]), list)
    out = apply_on_demand(frame, [feature])
    assert list(out.index) == ["a"] and list(out.columns) == ["m", "s", "mps"]
    assert row == {"m": 3.0, "s": 1} and list(frame.columns) == ["m", "s"]
    with pytest.raises(ValueError, match="already are columns"):
        apply_on_demand(out, [feature])
    with pytest.raises(TypeError, match="expected a DataFrame"):
        apply_on_demand(42, [feature])  # type: ignore[call-overload]
