"""The demo features DAG run for real with `airflow dags test`: the offline store gets its
partitions, the online store its rows, and a re-run materializes nothing new."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def features_dags_test(env: dict[str, str], logical_date: str):
    command = [AIRFLOW, "dags", "test", "churn_features", logical_date]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def test_features_dag_fills_offline_and_online_stores_idempotently(dags_test_env, monkeypatch):
    from airmlops.features.online import SqliteOnlineStore
    from airmlops.spec import load_spec

    result = features_dags_test(dags_test_env, "2026-07-01T00:00:00+00:00")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    data_root = Path(dags_test_env["MLOPS_DATA_ROOT"])
    spec = load_spec(Path(__file__).resolve().parents[2] / "include/pipelines/churn.yaml")
    activity = data_root / "features" / "churn" / "activity"
    days = sorted(p.name for p in activity.glob("date=*"))
    assert days, "no offline partitions were written"
    assert days[-1] == "date=2026-07-01"
    assert len(days) >= spec.feature_store.backfill_days

    store = SqliteOnlineStore(data_root / "online" / "store.sqlite", "churn")
    try:
        result_rows = store.read(spec.feature_store.views, ["C000001", "C000002", "NOBODY"],
                                 as_of=dt.datetime(2026, 7, 1, 12, tzinfo=dt.UTC))
    finally:
        store.close()
    assert result_rows.missing == ["NOBODY"]
    assert result_rows["C000001"]["profile__plan"] in {"basic", "standard", "premium"}

    again = features_dags_test(dags_test_env, "2026-07-01T00:00:00+00:00")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    output = again.stdout + again.stderr
    assert "'activity': 0" in output and "'profile': 0" in output, output[-3000:]
