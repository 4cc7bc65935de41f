"""The ``estimated_performance`` breach and trigger: the label-free estimate judged against the
performance floor, recorded like every breach, and counted towards a retraining only when
``policy.triggers`` lists it."""

from __future__ import annotations

import datetime as dt

import pytest

from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.judgement import WindowNumbers, judge
from airmlops.monitoring.policy import WindowRecord, decide
from airmlops.monitoring.store import MonitoringStore
from airmlops.spec import SpecError, parse_spec

T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
FLOOR = {"metric": "roc_auc", "min": 0.75, "min_labels": 200}
DEFAULT = MonitoringConfig(performance=FLOOR, policy={"k": 2, "n": 3})
OPTED_IN = MonitoringConfig(performance=FLOOR, policy={
    "k": 2, "n": 3, "triggers": ["drift_share", "performance", "estimated_performance"]})


def _numbers(auc: float | None, rows: int = 18_000) -> WindowNumbers:
    estimate = None if auc is None else {"roc_auc": auc, "accuracy": 0.8, "precision": 0.6,
                                         "recall": 0.2, "rows": rows}
    return WindowNumbers(drift_share=0.0, estimated_performance=estimate)


def test_an_estimate_below_the_floor_is_a_breach_with_its_reason():
    judgement = judge(_numbers(0.70), DEFAULT)
    assert judgement.breaches == ["estimated_performance"]
    assert judgement.reasons["estimated_performance"] == (
        "estimated roc_auc 0.7 on 18000 predictions (no labels), below performance.min (0.75)")


@pytest.mark.parametrize("numbers", [_numbers(0.80), _numbers(None), _numbers(0.70, rows=150)])
def test_no_breach_above_the_floor_without_an_estimate_or_on_too_few_rows(numbers):
    assert judge(numbers, DEFAULT).breaches == []


def test_without_a_floor_the_estimate_is_only_recorded():
    assert judge(_numbers(0.5), MonitoringConfig()).breaches == []


def _history(auc: float) -> list[WindowRecord]:
    return [WindowRecord(window_id=f"w{i:03d}", start=T0 + dt.timedelta(hours=i),
                         end=T0 + dt.timedelta(hours=i + 1), numbers=_numbers(auc))
            for i in range(3)]


@pytest.mark.parametrize(("config", "action"), [(DEFAULT, "none"), (OPTED_IN, "retrain")])
def test_it_retrains_only_when_policy_triggers_lists_it(config, action):
    history = _history(0.70)
    decision = decide(history, config, now=history[-1].end, last_retraining_at=None,
                      active_retrainings=0, window_id=history[-1].window_id)
    assert decision.action == action, decision.reason
    if action == "retrain":
        assert "estimated_performance" in decision.reason


def test_a_recorded_window_is_judged_again_from_its_stored_estimate(tmp_path):
    from airmlops.monitoring.measurement import WindowReport

    store = MonitoringStore(tmp_path)
    for i in range(3):
        start = T0 + dt.timedelta(hours=i)
        store.record_window("churn", WindowReport(
            window_id=f"{start:%Y%m%dT%H%M}-{start + dt.timedelta(hours=1):%Y%m%dT%H%M}",
            start=start, end=start + dt.timedelta(hours=1), rows=18_000, sampled=5000,
            columns={}, drift_share=0.0, prediction_drift=None, quality={}, performance=None,
            label_count=0, breaches=[], estimated_performance=_numbers(0.70)
            .estimated_performance), created=start)
    history = store.history("churn", 3)
    decision = decide(history, OPTED_IN, now=history[-1].end, last_retraining_at=None,
                      active_retrainings=0, window_id=history[-1].window_id)
    assert decision.action == "retrain", decision.reason


def _spec(task: str, monitoring: dict) -> dict:
    return {"name": "churn", "task": task, "source": {"kind": "simulator"},
            "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
            "features": [{"name": "sessions", "type": "numeric"}],
            "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"
                          if task != "regression" else "sklearn.linear_model.Ridge"},
            "gates": {"primary_metric": "roc_auc" if task != "regression" else "rmse"},
            "monitoring": monitoring}


@pytest.mark.parametrize(("task", "performance"), [
    ("binary_classification", {}),
    ("regression", {"metric": "rmse", "max": 3.0}),
])
def test_the_trigger_needs_a_classifier_and_a_floor(task, performance):
    monitoring = {"performance": performance,
                  "policy": {"triggers": ["performance", "estimated_performance"]}}
    with pytest.raises(SpecError, match=r"policy\.triggers: 'estimated_performance'"):
        parse_spec(_spec(task, monitoring))
    assert parse_spec(_spec("binary_classification", {
        "performance": FLOOR, "policy": {"triggers": ["estimated_performance"]}}))
