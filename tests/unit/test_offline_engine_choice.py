"""``feature_store.offline_engine``: the spec picks the point-in-time engine, both build the same
training set, and the memory engine refuses up front a join that would not fit."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest
import yaml

from airmlops.data.simulator import simulate_observations
from airmlops.features.join_memory import (
    JoinEstimate,
    JoinTooLarge,
    available_memory_mb,
    check_join_fits,
    estimate_join,
)
from airmlops.features.pipeline import build_offline, historical_features, training_frame
from airmlops.spec import PipelineSpec, parse_spec

DEMO = Path(__file__).resolve().parents[2] / "include" / "pipelines" / "churn.yaml"
START = dt.date(2026, 2, 1)
END = dt.date(2026, 2, 15)


def demo_spec(engine: str | None) -> PipelineSpec:
    data = yaml.safe_load(DEMO.read_text())
    data["source"]["customers"] = 300
    if engine is not None:
        data["feature_store"]["offline_engine"] = engine
    return parse_spec(data)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("data")
    spec = demo_spec(None)
    build_offline(spec, START, END, root)
    batch = simulate_observations(spec.source, START - dt.timedelta(days=2), END)
    return root, batch


def test_the_default_engine_is_memory_and_stays_out_of_the_hashes() -> None:
    default, memory = demo_spec(None), demo_spec("memory")
    assert default.feature_store.offline_engine == "memory"
    assert default.spec_hash() == memory.spec_hash()
    assert default.features_hash() == memory.features_hash()
    assert demo_spec("duckdb").spec_hash() != default.spec_hash()


def test_a_training_set_built_with_duckdb_equals_the_memory_engines(
        store: tuple[Path, pd.DataFrame]) -> None:
    root, batch = store
    by_memory = training_frame(demo_spec("memory"), batch, root)
    by_duckdb = training_frame(demo_spec("duckdb"), batch, root)
    pd.testing.assert_frame_equal(by_duckdb, by_memory)
    assert by_memory["profile__plan"].notna().any()
    assert by_memory["activity__sessions_sum_7d"].isna().any()  # rows before the first day


def test_the_memory_engine_refuses_a_join_that_would_not_fit_and_names_the_fix(
        store: tuple[Path, pd.DataFrame]) -> None:
    root, batch = store
    spec = demo_spec("memory")
    entity_df = batch[[spec.entity_key, spec.timestamp, "tenure_days"]]
    with pytest.raises(JoinTooLarge) as refused:
        historical_features(spec, entity_df, root, available_mb=0.1)
    message = str(refused.value)
    assert "feature_store.offline_engine: duckdb" in message
    assert "Spark" in message and "of the 0 MB available" in message
    assert len(historical_features(spec, entity_df, root, available_mb=100_000.0)) == len(batch)
    # the spilling engine is not held to the memory engine's estimate
    spilling = historical_features(demo_spec("duckdb"), entity_df, root, available_mb=0.1)
    assert len(spilling) == len(batch)


def test_the_estimate_counts_both_sides_of_the_join(store: tuple[Path, pd.DataFrame]) -> None:
    root, batch = store
    spec = demo_spec(None)
    views = spec.feature_store.views
    estimate = estimate_join(batch, views, root, spec.name, timestamp_column=spec.timestamp,
                             on_demand=spec.feature_store.on_demand)
    features = sum(len(v.feature_names) for v in views) + len(spec.feature_store.on_demand)
    assert estimate.entity_cells == len(batch) * (features + 2)
    assert estimate.stored_rows > 0 and estimate.stored_cells > 2 * estimate.stored_rows


def test_the_estimate_is_calibrated_on_the_measured_ten_million_row_join() -> None:
    # benchmarks/results/scale_offline.md: 10M entity rows, 14 + 2 features, one key, 3 views
    # of 3M stored rows (6 + 4 + 4 features): 1,916 MB peak.
    estimate = JoinEstimate(entity_rows=10_000_000, entity_cells=10_000_000 * 18,
                            stored_rows=9_000_000, stored_cells=3_000_000 * (8 + 6 + 6))
    assert 0.9 * 1_916 < estimate.peak_mb < 1.1 * 1_916
    check_join_fits(estimate, available_mb=4_000)
    with pytest.raises(JoinTooLarge, match="1,913 MB"):
        check_join_fits(estimate, available_mb=3_000)  # 60% of it is 1,800 MB


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2048000 kB\n")
    assert available_memory_mb(meminfo) == 2000.0
    assert available_memory_mb(tmp_path / "missing") is None
