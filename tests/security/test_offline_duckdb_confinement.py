"""The DuckDB point-in-time engine reads only the partitions the store lists and writes only its
temporary folder under the data root; a spec naming an unknown engine is refused."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml

from airmlops.features.definitions import FEATURE_TIMESTAMP, Entity, FeatureView
from airmlops.features.offline import get_historical_features, partition_files, write_view_rows
from airmlops.features.offline_duckdb import (
    TEMP_PARTS,
    confined_connection,
    get_historical_features_duckdb,
)
from airmlops.spec import SpecError, parse_spec

PLAN = FeatureView(name="plan", entity=Entity(name="customer", join_key="customer_id"),
                   source="profiles", ttl_days=30, columns=["fee"])
DEMO = Path(__file__).resolve().parents[2] / "include" / "pipelines" / "churn.yaml"
PLANTED = 666.0


def stored(fee: float, day: str = "2026-03-01") -> pd.DataFrame:
    return pd.DataFrame({"customer_id": [1, 2], FEATURE_TIMESTAMP: pd.Timestamp(day, tz="UTC"),
                         "plan__fee": [fee, fee + 1]})


def test_files_beside_the_listed_partitions_are_never_read(tmp_path: Path) -> None:
    write_view_rows(stored(10.0), PLAN, tmp_path, "churn")
    [current] = partition_files(PLAN, tmp_path, "churn")
    stale = current.with_name("part-0000stale.parquet")  # an older file of the same day
    stored(PLANTED).to_parquet(stale)
    os.utime(stale, ns=(1, 1))
    stray = current.parent.parent / "notadate"  # a folder that is no partition
    stray.mkdir()
    stored(PLANTED).to_parquet(stray / "part-1.parquet")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.parquet"
    stored(PLANTED).to_parquet(outside)
    frame = pd.DataFrame({"customer_id": [1, 2],
                          "event_timestamp": pd.Timestamp("2026-03-02", tz="UTC")})
    got = get_historical_features_duckdb(frame, [PLAN], tmp_path, "churn", memory_limit_mb=64)
    assert got["plan__fee"].tolist() == [10.0, 11.0]
    pd.testing.assert_frame_equal(got, get_historical_features(frame, [PLAN], tmp_path, "churn"))
    outside.unlink()


def test_the_connection_refuses_every_file_and_setting_it_was_not_given(
        tmp_path: Path) -> None:
    write_view_rows(stored(10.0), PLAN, tmp_path, "churn")
    [listed] = partition_files(PLAN, tmp_path, "churn")
    other = tmp_path / "other.parquet"
    stored(PLANTED).to_parquet(other)
    secret = pd.DataFrame({"x": [PLANTED]})  # a Python variable a replacement scan would see
    with confined_connection(tmp_path, [listed], 64, 1) as (con, temp):
        assert temp.is_relative_to(tmp_path / Path(*TEMP_PARTS))
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [[str(listed)]]).fetchone()[0]
        denied, locked = duckdb.PermissionException, duckdb.InvalidInputException
        refused = [
            ("SELECT * FROM read_parquet(?)", [[str(other)]], denied),
            ("SELECT * FROM read_csv(?)", ["/etc/passwd"], denied),
            ("SELECT * FROM read_text(?)", [str(DEMO)], denied),
            (f"COPY (SELECT 1) TO '{tmp_path / 'written.csv'}'", None, denied),
            (f"ATTACH '{tmp_path / 'other.duckdb'}'", None, denied),
            ("INSTALL httpfs", None, denied),
            ("LOAD httpfs", None, denied),
            ("SET enable_external_access = true", None, locked),
            ("SET allowed_paths = ['/']", None, locked),
            ("SET temp_directory = '/tmp'", None, locked),
            ("SELECT * FROM secret", None, duckdb.CatalogException),
        ]
        for sql, params, error in refused:
            with pytest.raises(error):
                con.execute(sql, params)
    assert not (tmp_path / "written.csv").exists()
    assert not (tmp_path / "other.duckdb").exists()
    assert not temp.exists()
    del secret


def test_the_temporary_folder_cannot_leave_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / TEMP_PARTS[0]).symlink_to(elsewhere)  # tmp/ pointing out of the root
    write_view_rows(stored(10.0), PLAN, root, "churn")
    frame = pd.DataFrame({"customer_id": [1], "event_timestamp": pd.Timestamp("2026-03-02")})
    with pytest.raises(ValueError, match="escapes the root"):
        get_historical_features_duckdb(frame, [PLAN], root, "churn", memory_limit_mb=64)
    assert not any(elsewhere.iterdir())


def test_feature_names_reach_duckdb_only_as_quoted_validated_identifiers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="should match pattern"):
        FeatureView(name="plan", entity=Entity(name="customer", join_key="customer_id"),
                    source="profiles", ttl_days=1, columns=['fee" FROM x; --'])
    assert np.isnan(get_historical_features_duckdb(
        pd.DataFrame({"customer_id": [1], "event_timestamp": pd.Timestamp("2026-03-02")}),
        [PLAN], tmp_path, "churn", memory_limit_mb=64)["plan__fee"].iloc[0])


@pytest.mark.parametrize("engine", ["spark", "DuckDB", "duckdb; DROP TABLE x", 1])
def test_an_unknown_engine_in_a_spec_is_refused_naming_the_field(engine: object) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["feature_store"]["offline_engine"] = engine
    with pytest.raises(SpecError, match=r"feature_store\.offline_engine: Input should be "
                                        r"'memory' or 'duckdb'"):
        parse_spec(data)
