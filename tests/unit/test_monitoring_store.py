"""The monitoring table: idempotent upserts by window, decisions, history and last retraining."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.drift import ColumnDriftResult, WindowReport
from airmlops.monitoring.policy import Decision, decide, dedup_key
from airmlops.monitoring.store import MonitoringStore

T0 = dt.datetime(2026, 4, 1, 10, tzinfo=dt.UTC)


def report(i: int, *breaches: str, performance: dict | None = None, labels: int = 0,
           html: str | None = None) -> WindowReport:
    start = T0 + dt.timedelta(hours=i)
    return WindowReport(
        window_id=f"w{i:03d}", start=start, end=start + dt.timedelta(hours=1), rows=1000 + i,
        sampled=1000, columns={"sessions": ColumnDriftResult("wasserstein", 0.1, 0.4, True),
                               "plan": ColumnDriftResult("jensenshannon", 0.1, 0.01, False)},
        drift_share=0.5, prediction_drift=ColumnDriftResult("wasserstein", 0.1, 0.02, False),
        quality={"sessions": {"missing_share": 0.0}}, performance=performance,
        label_count=labels, breaches=list(breaches), notes=["a note"], html_path=html,
    )


@pytest.fixture
def store(tmp_path: Path) -> MonitoringStore:
    return MonitoringStore(tmp_path)


def test_the_table_lives_in_one_sqlite_file_per_pipeline(store: MonitoringStore,
                                                         tmp_path: Path) -> None:
    store.record_window("churn", report(0), created=T0)
    path = tmp_path / "monitoring" / "churn.sqlite"
    assert store.path("churn") == path and path.is_file()
    with sqlite3.connect(path) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(windows)")}
    assert {"window_id", "start", "end", "rows", "drift_share", "breaches", "performance",
            "quality", "decision", "reason", "triggered_run_id", "html_path",
            "created"} <= columns
    for bad in ("../x", "Churn", "a/b", ""):
        with pytest.raises(ValueError, match="pipeline"):
            store.path(bad)


def test_a_repeated_window_is_updated_not_duplicated(store: MonitoringStore) -> None:
    store.record_window("churn", report(0, "drift_share"), created=T0)
    store.record_window("churn", report(1), created=T0)
    later = T0 + dt.timedelta(days=2)
    store.record_window("churn", report(0, "drift_share", "performance",
                                        performance={"roc_auc": 0.6}, labels=300),
                        created=later)
    assert store.count("churn") == 2
    row = store.window("churn", "w000")
    assert row["breaches"] == ["drift_share", "performance"]
    assert row["performance"] == {"roc_auc": 0.6}
    assert row["label_count"] == 300
    assert row["created"] == T0.isoformat() and row["updated"] == later.isoformat()
    assert row["columns"]["sessions"] == {"method": "wasserstein", "threshold": 0.1,
                                          "score": 0.4, "drifted": True}
    assert store.window("churn", "w999") is None


def test_history_is_the_last_n_windows_oldest_first(store: MonitoringStore) -> None:
    for i in (3, 0, 2, 1, 4):  # recorded out of order
        store.record_window("churn", report(i, *(["drift_share"] if i % 2 else [])), created=T0)
    history = store.history("churn", 3)
    assert [r.window_id for r in history] == ["w002", "w003", "w004"]
    assert history[1].breaches == ("drift_share",)
    assert history[0].start == T0 + dt.timedelta(hours=2)
    assert store.history("other", 3) == []
    with pytest.raises(ValueError):
        store.history("churn", 0)


def test_decisions_are_recorded_with_their_reason(store: MonitoringStore) -> None:
    store.record_window("churn", report(0), created=T0)
    decision = Decision("none", "latest window w000 not breached", {"k": 2},
                        dedup_key("w000"))
    assert store.record_decision("churn", "w000", decision, decided_at=T0)
    row = store.window("churn", "w000")
    assert (row["decision"], row["reason"], row["evidence"]) == (
        "none", "latest window w000 not breached", {"k": 2})
    assert row["dedup_key"] == "retrain__w000" and row["triggered_run_id"] is None
    assert store.last_retraining("churn") is None
    with pytest.raises(KeyError):
        store.record_decision("churn", "w404", decision, decided_at=T0)


def test_last_retraining_and_the_replay_guard(store: MonitoringStore) -> None:
    config = MonitoringConfig(policy={"k": 2, "n": 3})
    for i in range(2):
        store.record_window("churn", report(i, "drift_share"), created=T0)
    decided_at = T0 + dt.timedelta(hours=2)
    history = store.history("churn", config.policy.n)
    decision = decide(history, config, now=decided_at, last_retraining_at=None,
                      active_retrainings=0, window_id="w001")
    assert decision.action == "retrain"
    store.record_decision("churn", "w001", decision, decided_at=decided_at,
                          triggered_run_id=decision.dedup_key)
    last = store.last_retraining("churn")
    assert (last.window_id, last.decided_at, last.triggered_run_id) == (
        "w001", decided_at, "retrain__w001")

    # The same window's monitoring run again, an hour later: the report is upserted, the
    # decision (and when it was taken) are kept, and the policy replays "retrain".
    store.record_window("churn", report(1, "drift_share"), created=decided_at)
    replay = decide(store.history("churn", 3), config, now=decided_at + dt.timedelta(hours=1),
                    last_retraining_at=last.decided_at, active_retrainings=1, window_id="w001")
    assert replay.action == "retrain" and replay.dedup_key == decision.dedup_key
    store.record_decision("churn", "w001", replay, decided_at=decided_at + dt.timedelta(hours=1))
    assert store.last_retraining("churn").decided_at == decided_at
    # A "none" never overwrites a recorded retraining (the cooldown would be lost).
    assert not store.record_decision("churn", "w001", Decision("none", "x", {}, "k"),
                                     decided_at=decided_at)
    assert store.window("churn", "w001")["decision"] == "retrain"

    # The next window is breached too, but it is inside the cooldown.
    store.record_window("churn", report(2, "drift_share"), created=decided_at)
    blocked = decide(store.history("churn", 3), config, now=decided_at + dt.timedelta(hours=1),
                     last_retraining_at=store.last_retraining("churn").decided_at,
                     active_retrainings=0, window_id="w002")
    assert blocked.action == "none" and "cooldown until" in blocked.reason


def test_times_must_be_timezone_aware(store: MonitoringStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record_window("churn", report(0), created=T0.replace(tzinfo=None))
    naive = report(0)
    naive = WindowReport(**{**naive.__dict__, "start": naive.start.replace(tzinfo=None)})
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record_window("churn", naive, created=T0)


def test_two_store_objects_share_one_table(tmp_path: Path) -> None:
    first, second = MonitoringStore(tmp_path), MonitoringStore(tmp_path)
    first.record_window("churn", report(0), created=T0)
    second.record_window("churn", report(0), created=T0)
    second.record_window("churn", report(1), created=T0)
    assert first.count("churn") == 2
    assert [r.window_id for r in first.history("churn", 10)] == ["w000", "w001"]
