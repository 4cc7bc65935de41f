"""The monitoring DAG's stages on crafted inputs, no servers: collect (windows of a SQLite
prediction log, delayed labels and their lookback), report (no champion, no reference, drift
and performance against a reference), decide (the policy on the recorded windows, what the
trigger is given), act (the trigger operator's rendered conf is what the training DAG accepts)
and retain (old windows' files deleted, nothing else)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from airmlops.data.simulator import simulate_observations
from airmlops.monitoring import tasks
from airmlops.monitoring.drift import ColumnDriftResult, WindowReport
from airmlops.monitoring.store import MonitoringStore
from airmlops.serving.prediction_log import (
    LabelRecord,
    PredictionRecord,
    SqliteLogBackend,
    sqlite_log_path,
)
from airmlops.settings import Settings
from airmlops.spec import PipelineSpec, SpecError, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 6, 1, 10, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
MONITORING = {
    "schedule": "@hourly", "window_minutes": 60, "sample_size": 200,
    "reference_sample_size": 300, "strata": 4, "min_rows": 100, "retention_windows": 3,
    "drift": {"default": {"numeric": {"method": "wasserstein", "threshold": 0.2}},
              "columns": {"sessions": {"critical": True}}},
    "performance": {"metric": "roc_auc", "min": 0.55, "min_labels": 30,
                    "label_lookback_windows": 2},
    "policy": {"k": 2, "n": 3, "cooldown_hours": 24, "max_drift_share": 0.3},
}


def _spec(**monitoring: Any) -> PipelineSpec:
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    data.pop("feature_store")
    data["source"]["customers"] = 400
    data["monitoring"] = {**MONITORING, **monitoring}
    return parse_spec(data)


SPEC = _spec()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_root=tmp_path / "data", redis_url=None)


def window(i: int) -> tuple[dt.datetime, dt.datetime]:
    return T0 + i * HOUR, T0 + (i + 1) * HOUR


def score(frame: pd.DataFrame) -> np.ndarray:
    """A stand-in champion: a fixed logistic score of sessions and payment failures."""
    logit = (-0.5 - 0.6 * np.log1p(frame["sessions"].clip(lower=0))
             + 0.9 * frame["payment_failures"])
    return 1.0 / (1.0 + np.exp(-logit.to_numpy(dtype=float)))


def world(scenario: str, day: dt.date, rows: int, seed: int) -> pd.DataFrame:
    frame = simulate_observations(SPEC.source, day - dt.timedelta(days=6),
                                  day + dt.timedelta(days=1), scenario)
    return frame.sample(n=rows, replace=len(frame) < rows, random_state=seed).reset_index(
        drop=True)


def log_predictions(settings: Settings, rows: pd.DataFrame, start: dt.datetime,
                    prefix: str) -> list[PredictionRecord]:
    """Write ``rows`` as predictions spread over the hour from ``start`` (one per request)."""
    backend = SqliteLogBackend(sqlite_log_path(settings.data_root, SPEC.name))
    step = HOUR / (len(rows) + 1)
    probabilities = score(rows)
    records = []
    for i, row in enumerate(rows.to_dict(orient="records")):
        features = {name: row.get(name) for name in SPEC.input_names}
        records.append(PredictionRecord(
            request_id=f"{prefix}-{i}", position=0,
            ts_us=int((start + (i + 1) * step).timestamp() * 1_000_000), model_version="3",
            entity_id=row["customer_id"], inputs=features, features=features,
            prediction=float(probabilities[i] >= 0.5), probability=float(probabilities[i])))
    try:
        backend.write(records, [])
    finally:
        backend.close()
    return records


def log_labels(settings: Settings, records: list[PredictionRecord], outcomes: list[int],
               at: dt.datetime) -> None:
    backend = SqliteLogBackend(sqlite_log_path(settings.data_root, SPEC.name))
    stamp = int(at.timestamp() * 1_000_000)
    try:
        backend.write([], [LabelRecord(r.request_id, r.entity_id, float(label), stamp + i)
                           for i, (r, label) in enumerate(zip(records, outcomes, strict=True))])
    finally:
        backend.close()


# --- windows ------------------------------------------------------------------------------------


def test_a_window_is_its_data_interval_or_the_window_before_the_tick() -> None:
    start, end = window(0)
    assert tasks.window_bounds(start, end, 60) == (start, end)
    assert tasks.window_bounds(end, end, 60) == (start, end)  # a cron tick: empty interval
    assert tasks.window_bounds(None, end + dt.timedelta(microseconds=7), 60) == (start, end)
    with pytest.raises(ValueError, match="after its end"):
        tasks.window_bounds(end, start, 60)
    with pytest.raises(ValueError, match="timezone-aware"):
        tasks.window_bounds(None, end.replace(tzinfo=None), 60)
    assert tasks.window_id_for(start, end) == "20260601T1000-20260601T1100"
    odd = (start + dt.timedelta(seconds=5), end)
    assert tasks.window_id_for(*odd) == "20260601T100005-20260601T110000"
    assert tasks.parse_window_id(tasks.window_id_for(*odd)) == odd
    for bad in ("w1", "20260601T1000-../x", "20260601T1000"):
        with pytest.raises(ValueError):
            tasks.parse_window_id(bad)


def test_log_rows_are_flattened_to_one_typed_column_per_model_input() -> None:
    log = pd.DataFrame({
        "ts": pd.to_datetime([T0, T0 + HOUR / 2]), "request_id": ["a", "b"],
        "entity_id": ["C1", "C2"], "position": [0, 0], "model_version": [3, 3],
        "prediction": [1.0, 0.0], "probability": [0.8, 0.1],
        "features": [{"sessions": "4", "plan": "basic", "monthly_fee": None}, "not a dict"],
    })
    flat = tasks.flatten_predictions(log, SPEC)
    assert list(flat.columns[:6]) == list(tasks.LOG_COLUMNS)
    assert flat["prediction"].tolist() == [0.8, 0.1]  # the positive-class probability
    assert flat["model_version"].tolist() == ["3", "3"]
    assert flat["sessions"].tolist()[0] == 4.0 and np.isnan(flat["sessions"].tolist()[1])
    assert flat["plan"].tolist() == ["basic", None]
    assert set(SPEC.input_names) <= set(flat.columns)


# --- collect ------------------------------------------------------------------------------------


def test_collect_joins_late_labels_with_predictions_of_earlier_windows(settings) -> None:
    day = T0.date()
    first = log_predictions(settings, world("stable", day, 300, 1), window(0)[0], "w0")
    second = log_predictions(settings, world("stable", day, 300, 2), window(1)[0], "w1")
    # In window 1: labels of 100 predictions of window 0 and 50 of window 1.
    log_labels(settings, first[:100], [1] * 100, window(1)[0] + dt.timedelta(minutes=40))
    log_labels(settings, second[:50], [0] * 50, window(1)[0] + dt.timedelta(minutes=50))
    # In window 3: labels of window 0 predictions, older than the 2-window lookback.
    log_labels(settings, first[200:220], [1] * 20, window(3)[0] + dt.timedelta(minutes=5))

    collected = {i: tasks.collect_window(SPEC, *window(i), settings) for i in range(4)}
    assert collected[0]["rows"] == 300 and collected[0]["labels_received"] == 0
    assert collected[0]["model_versions"] == {"3": 300}
    one = collected[1]
    assert (one["rows"], one["labels_received"], one["labelled_rows"]) == (300, 150, 150)
    assert one["earlier_predictions_matched"] == 100 and one["labels_unmatched"] == 0
    assert one["label_lookback_start"] == (window(1)[1] - 2 * HOUR).isoformat()
    labelled = pd.read_parquet(one["labelled_path"])
    assert set(labelled["request_id"]) == {r.request_id for r in first[:100] + second[:50]}
    assert labelled["ts"].is_monotonic_increasing
    assert list(labelled.columns) == list(tasks.LABELLED_COLUMNS)
    three = collected[3]
    assert (three["rows"], three["labels_received"], three["labelled_rows"]) == (0, 20, 0)
    assert three["labels_unmatched"] == 20
    directory = tasks.window_dir(settings, SPEC.name, one["window_id"])
    assert Path(one["predictions_path"]) == directory / tasks.PREDICTIONS_FILE

    # A retry rewrites the same window, and a longer lookback (a spec setting) finds more.
    before = pd.read_parquet(one["predictions_path"])
    again = tasks.collect_window(SPEC, *window(1), settings)
    assert again == one and pd.read_parquet(again["predictions_path"]).equals(before)
    longer = _spec(retention_windows=4,
                   performance={**MONITORING["performance"], "label_lookback_windows": 4})
    wider = tasks.collect_window(longer, *window(3), settings)
    assert wider["labelled_rows"] == 20 and wider["labels_unmatched"] == 0


def test_the_label_lookback_is_a_validated_spec_setting() -> None:
    assert _spec().monitoring.performance.label_lookback_windows == 2
    assert parse_spec({**yaml.safe_load((REPO_ROOT / "include" / "pipelines" /
                                         "churn.yaml").read_text())}
                      ).monitoring.performance.label_lookback_windows == 48
    with pytest.raises(SpecError, match="label_lookback_windows"):
        _spec(performance={**MONITORING["performance"], "label_lookback_windows": 0})
    with pytest.raises(SpecError, match="reach back 417 days"):
        _spec(retention_windows=10_000,
              performance={**MONITORING["performance"], "label_lookback_windows": 10_000})
    with pytest.raises(SpecError, match=r"retention_windows \(3\) must be at least"):
        _spec(performance={**MONITORING["performance"], "label_lookback_windows": 5})


# --- report -------------------------------------------------------------------------------------


class Champion:
    version = "3"


def _report(settings, collected, monkeypatch, champion=Champion()) -> tuple[dict, list]:
    from airmlops.training import registry

    logged: list[tuple[WindowReport, dict]] = []
    monkeypatch.setattr(registry, "get_alias_version", lambda *args, **kwargs: champion)
    monkeypatch.setattr(tasks, "log_report_to_mlflow",
                        lambda spec, report, tags, uri: logged.append((report, tags)) or "run-1")
    return tasks.compute_report(SPEC, collected, settings, airflow_run_id="manual__x"), logged


def _reference(settings: Settings) -> None:
    from airmlops.monitoring.reference import summarize_reference

    frame = world("stable", (T0 - dt.timedelta(days=30)).date(), 1500, 9)
    frame["prediction"] = score(frame)
    summarize_reference(frame, SPEC, SPEC.monitoring, settings.data_root / "monitoring"
                        / SPEC.name / "reference" / Champion.version)


def test_report_without_champion_or_reference_records_why_and_decides_nothing(
        settings, monkeypatch) -> None:
    log_predictions(settings, world("stable", T0.date(), 150, 1), window(0)[0], "w0")
    collected = tasks.collect_window(SPEC, *window(0), settings)
    summary, logged = _report(settings, collected, monkeypatch, champion=None)
    assert summary["skipped"].startswith("no champion") and summary["rows"] == 150
    assert summary["html_path"] is None and logged[0][1]["champion_version"] == "none"
    decided = tasks.decide_window(SPEC, summary, settings, now=window(0)[1],
                                  active_retrainings=0)
    assert decided["action"] == "none" and decided["reason"].startswith("not assessed: no "
                                                                       "champion")
    row = MonitoringStore(settings.data_root).window(SPEC.name, collected["window_id"])
    assert row["decision"] == "none" and row["notes"] == [summary["skipped"]]

    summary, _ = _report(settings, collected, monkeypatch)  # a champion, no reference data
    assert "no reference data for champion version 3" in summary["skipped"]


def test_report_tests_drift_and_scores_the_labels_that_arrived(settings, monkeypatch) -> None:
    _reference(settings)
    day = T0.date()
    stable = log_predictions(settings, world("stable", day, 400, 1), window(0)[0], "w0")
    rows = world("covariate_drift", day, 400, 2)
    log_predictions(settings, rows, window(1)[0], "w1")
    outcomes = world("stable", day, 400, 1)["churned"].astype(int).tolist()
    log_labels(settings, stable[:200], outcomes[:200], window(1)[0] + dt.timedelta(minutes=30))

    calm, logged = _report(settings, tasks.collect_window(SPEC, *window(0), settings),
                           monkeypatch)
    assert calm["skipped"] is None and calm["breaches"] == [] and calm["sampled"] == 200
    assert calm["champion_version"] == "3" and calm["mlflow_run_id"] == "run-1"
    assert Path(calm["html_path"]).is_file()
    assert calm["html_path"] == str(tasks.report_html_path(settings, SPEC.name,
                                                          calm["window_id"]))
    assert logged[0][1]["airflow_run_id"] == "manual__x"

    drifted, _ = _report(settings, tasks.collect_window(SPEC, *window(1), settings),
                         monkeypatch)
    assert {"drift_share", "feature:sessions"} <= set(drifted["breaches"])
    assert "sessions" in drifted["drifted"] and drifted["drift_share"] >= 0.3
    # Performance on the 200 labels that arrived in window 1 (for window 0's predictions).
    assert drifted["label_count"] == 200 and 0.5 < drifted["performance"]["roc_auc"] <= 1.0
    assert Path(drifted["performance_html"]).is_file()
    row = MonitoringStore(settings.data_root).window(SPEC.name, drifted["window_id"])
    assert row["breaches"] == drifted["breaches"] and row["label_count"] == 200


# --- decide -------------------------------------------------------------------------------------


def record(settings: Settings, i: int, *breaches: str) -> dict[str, Any]:
    """Record window ``i`` with ``breaches``; return the report task's summary of it."""
    start, end = window(i)
    window_id = tasks.window_id_for(start, end)
    MonitoringStore(settings.data_root).record_window(SPEC.name, WindowReport(
        window_id=window_id, start=start, end=end, rows=1000, sampled=200,
        columns={"sessions": ColumnDriftResult("wasserstein", 0.2, 0.5, bool(breaches))},
        drift_share=0.5 if breaches else 0.0, prediction_drift=None, quality={},
        performance=None, label_count=0, breaches=sorted(breaches)), created=end)
    return {"window_id": window_id, "end": end.isoformat(), "breaches": list(breaches),
            "html_path": f"/reports/{window_id}.html", "drift_share": 0.5, "skipped": None}


def test_decide_retrains_on_k_of_n_and_hands_the_trigger_what_it_needs(settings,
                                                                        monkeypatch) -> None:
    from airmlops import alerts

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(alerts, "post_webhook", lambda config, payload: sent.append(payload))
    spec = parse_spec({**SPEC.model_dump(mode="json"),
                       "alerts": {"webhook": {"url": "http://127.0.0.1:9/hook"}}})
    decisions = []
    for i, breaches in enumerate([(), ("drift_share",), ("feature:sessions", "drift_share")]):
        decisions.append(tasks.decide_window(spec, record(settings, i, *breaches), settings,
                                             now=window(i)[1], active_retrainings=0))
    assert [d["action"] for d in decisions] == ["none", "none", "retrain"]
    assert decisions[1]["reason"] == "only 1 of last 3 windows breached (need 2)"
    assert decisions[0]["trigger_run_id"] is None and decisions[0]["trigger_conf"] is None
    retrain = decisions[2]
    window_id = retrain["window_id"]
    assert retrain["trigger_run_id"] == retrain["dedup_key"] == f"retrain__{window_id}"
    assert retrain["trigger_reason"] == (
        f"monitoring of {SPEC.name}, window {window_id}: 2 of last 3 windows breached (need 2), "
        "latest by drift_share, feature:sessions")
    assert retrain["trigger_conf"] == {
        "trigger_reason": retrain["trigger_reason"], "triggered_by": "monitoring",
        "monitoring_window": window_id, "data_end": window(2)[1].isoformat(),
        "scenario": "stable", "scenario_start": None}  # the world the window was observed in
    assert retrain["breached_windows"] == [decisions[1]["window_id"], window_id]
    assert [p["event"] for p in sent] == ["retraining_decision"]
    assert sent[0]["details"]["trigger_run_id"] == f"retrain__{window_id}"

    # The same window decided again (a repeated run): the same trigger, no second alert.
    again = tasks.decide_window(spec, record(settings, 2, "drift_share"), settings,
                                now=window(2)[1], active_retrainings=1)
    assert again["action"] == "retrain" and again["replayed"] is True
    assert again["trigger_run_id"] == retrain["trigger_run_id"] and len(sent) == 1

    # The next breached window: within the cooldown and with the retraining still running.
    blocked = tasks.decide_window(spec, record(settings, 3, "drift_share"), settings,
                                  now=window(3)[1], active_retrainings=1)
    assert blocked["action"] == "none" and blocked["trigger_run_id"] is None
    assert "blocked: already one retraining active" in blocked["reason"]
    assert "cooldown until" in blocked["reason"]
    store = MonitoringStore(settings.data_root)
    assert store.last_retraining(SPEC.name).window_id == window_id
    assert store.window(SPEC.name, blocked["window_id"])["reason"] == blocked["reason"]


def test_a_dry_run_records_what_it_would_do_and_triggers_nothing(settings) -> None:
    for i in range(2):
        decided = tasks.decide_window(SPEC, record(settings, i, "drift_share"), settings,
                                      now=window(i)[1], active_retrainings=0, dry_run=True)
    assert decided["action"] == "none" and decided["trigger_run_id"] is None
    assert decided["reason"].startswith("dry run, would retrain: 2 of last 3 windows")
    assert MonitoringStore(settings.data_root).last_retraining(SPEC.name) is None


def test_the_trigger_reason_is_one_line_of_at_most_500_characters() -> None:
    reason = tasks.trigger_reason(SPEC, "w1", "drifted:\n" + "x " * 400)
    assert len(reason) == 500 and reason.endswith("...") and "\n" not in reason
    assert tasks.trigger_reason(SPEC, "w1", "short") == "monitoring of churn, window w1: short"


# --- act ----------------------------------------------------------------------------------------


class FakeTI:
    def __init__(self, decision: dict[str, Any]) -> None:
        self.decision = decision

    def xcom_pull(self, task_ids: str) -> dict[str, Any]:
        assert task_ids == "decide"
        return self.decision


def test_act_triggers_training_with_what_the_training_dag_accepts(tmp_path: Path,
                                                                   settings) -> None:
    from airmlops.dags.common import parse_data_end, training_params
    from airmlops.dags.monitoring import build_monitoring_dag

    spec_path = tmp_path / "churn.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC.model_dump(mode="json")))
    dag = build_monitoring_dag(SPEC, spec_path)
    assert {t.task_id for t in dag.get_task("report").downstream_list} == {"decide", "retain"}
    assert [t.task_id for t in dag.get_task("should_retrain").downstream_list] == ["act"]
    act = dag.get_task("act")
    assert act.trigger_dag_id == SPEC.training_dag_id and act.skip_when_already_exists
    assert act.logical_date is None

    for i, breaches in enumerate([("drift_share",), ("drift_share",)]):
        decision = tasks.decide_window(SPEC, record(settings, i, *breaches), settings,
                                       now=window(i)[1], active_retrainings=0)
    context = {"ti": FakeTI(decision)}
    run_id = act.render_template(act.trigger_run_id, context)
    conf = act.render_template(act.conf, context)
    assert run_id == f"retrain__{decision['window_id']}"
    assert conf == decision["trigger_conf"]  # a dict, not its text: the DAG renders natively
    assert conf["data_end"] == window(1)[1].isoformat() and conf["triggered_by"] == "monitoring"
    params = training_params()
    for key in ("trigger_reason", "data_end", "scenario", "scenario_start"):
        assert params[key].resolve(conf[key]) == conf[key]  # validates against the param
    assert parse_data_end(conf["data_end"]) == window(1)[1]
    # A drifted world travels with the trigger, so the retraining trains in it.
    drifted = _spec().model_copy(update={"source": SPEC.source.model_copy(
        update={"scenario": "covariate_drift", "scenario_start": dt.date(2026, 5, 1)})})
    pinned = tasks.trigger_conf(drifted, decision["window_id"], "drift")
    assert (pinned["scenario"], pinned["scenario_start"]) == ("covariate_drift", "2026-05-01")
    assert params["scenario_start"].resolve(pinned["scenario_start"]) == "2026-05-01"


# --- retain -------------------------------------------------------------------------------------


def test_retention_deletes_the_files_of_old_windows_only(settings) -> None:
    reports = settings.reports_dir / SPEC.name / "monitoring"
    reports.mkdir(parents=True)
    ids = [tasks.window_id_for(*window(i)) for i in range(8)]
    for window_id in ids:
        folder = tasks.window_dir(settings, SPEC.name, window_id)
        folder.mkdir(parents=True)
        (folder / tasks.PREDICTIONS_FILE).write_bytes(b"x")
        for suffix in (".html", ".snapshot.json", ".performance.html"):
            (reports / f"{window_id}{suffix}").write_text("x")
    (reports / "notes.txt").write_text("not a window")
    (reports.parent / "other.html").write_text("not monitoring")

    # Window 6 is the current one; retention 3 windows: windows ending at or before the end
    # of window 3 (T0 + 4 h) go, windows 4 and 5, the current one and a later one stay.
    result = tasks.prune_window_artifacts(SPEC, *window(6), settings)
    assert result["windows_pruned"] == ids[:4]
    assert result["folders_deleted"] == 4 and result["files_deleted"] == 12
    kept = sorted(p.name for p in tasks.window_dir(settings, SPEC.name, ids[0]).parent.iterdir())
    assert kept == ids[4:]
    assert sorted(p.name for p in reports.iterdir()) == sorted(
        ["notes.txt", *(f"{i}{s}" for i in ids[4:]
                        for s in (".html", ".snapshot.json", ".performance.html"))])
    assert (reports.parent / "other.html").is_file()
    again = tasks.prune_window_artifacts(SPEC, *window(6), settings)
    assert again["windows_pruned"] == [] and again["files_deleted"] == 0
    # Reporting an old window again deletes nothing newer than its own horizon.
    assert tasks.prune_window_artifacts(SPEC, *window(4), settings)["windows_pruned"] == []
    # The retention is the spec's: a longer one keeps more.
    longer = _spec(retention_windows=10)
    assert tasks.prune_window_artifacts(longer, *window(7), settings)["windows_pruned"] == []
    assert tasks.prune_window_artifacts(SPEC, *window(7), settings)["windows_pruned"] == [
        ids[4]]
