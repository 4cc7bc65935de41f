"""The retraining policy on crafted window histories, and the monitoring config's validation."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from airmlops.monitoring.config import MonitoringConfig, validate_against_spec
from airmlops.monitoring.judgement import WindowNumbers
from airmlops.monitoring.measurement import ColumnDriftResult, WindowReport
from airmlops.monitoring.policy import (
    Decision,
    WindowRecord,
    counted_breaches,
    decide,
    dedup_key,
    judged_breaches,
)
from airmlops.monitoring.store import MonitoringStore
from airmlops.spec import parse_spec

T0 = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
CONFIG = MonitoringConfig(
    performance={"metric": "roc_auc", "min": 0.7, "min_labels": 100},
    policy={"k": 2, "n": 3, "cooldown_hours": 24, "max_drift_share": 0.3},
)


def window(i: int, *breaches: str, labels: int = 0, decision: str | None = None,
           reason: str | None = None) -> WindowRecord:
    start = T0 + dt.timedelta(hours=i)
    return WindowRecord(window_id=f"w{i:03d}", start=start, end=start + dt.timedelta(hours=1),
                        breaches=tuple(breaches), label_count=labels, decision=decision,
                        reason=reason)


def run(history: list[WindowRecord], config: MonitoringConfig = CONFIG, *,
        last: dt.datetime | None = None, active: int = 0, hours_after: int = 1) -> Decision:
    now = history[-1].end + dt.timedelta(hours=hours_after - 1)
    return decide(history, config, now=now, last_retraining_at=last, active_retrainings=active,
                  window_id=history[-1].window_id)


def test_k_of_n_with_the_latest_breached_retrains() -> None:
    decision = run([window(0), window(1, "drift_share"), window(2, "feature:sessions")])
    assert decision.action == "retrain"
    assert decision.reason.startswith("2 of last 3 windows breached (need 2)")
    assert "feature:sessions" in decision.reason
    assert decision.evidence["breached_windows"] == ["w001", "w002"]
    assert decision.evidence["latest_breaches"] == ["feature:sessions"]


def test_one_breached_window_is_not_enough() -> None:
    decision = run([window(0), window(1), window(2, "drift_share")])
    assert decision.action == "none"
    assert decision.reason == "only 1 of last 3 windows breached (need 2)"


def test_the_latest_window_must_be_breached() -> None:
    decision = run([window(0, "drift_share"), window(1, "drift_share"), window(2)])
    assert decision.action == "none"
    assert decision.reason.startswith("latest window w002 not breached")
    assert decision.evidence["breached_windows"] == ["w000", "w001"]


def test_only_the_last_n_windows_count() -> None:
    history = [window(0, "drift_share"), window(1, "drift_share"), window(2), window(3),
               window(4, "drift_share")]
    decision = run(history)
    assert decision.action == "none"
    assert [w["window_id"] for w in decision.evidence["windows"]] == ["w002", "w003", "w004"]


def test_a_short_history_counts_missing_windows_as_not_breached() -> None:
    assert run([window(0, "drift_share")]).action == "none"
    assert run([window(0, "drift_share"), window(1, "drift_share")]).action == "retrain"


def test_cooldown_blocks_and_says_until_when() -> None:
    history = [window(0, "drift_share"), window(1, "drift_share")]
    last = history[-1].end - dt.timedelta(hours=2)
    decision = run(history, last=last)
    assert decision.action == "none"
    until = (last + dt.timedelta(hours=24)).isoformat()
    assert decision.reason.endswith(f"blocked: cooldown until {until}")
    assert decision.reason.startswith("2 of last 3 windows breached")
    assert decision.evidence["cooldown_until"] == until
    # Once the cooldown is over, the same history retrains.
    assert run(history, last=last, hours_after=23).action == "retrain"


def test_one_active_retraining_blocks_another() -> None:
    history = [window(0, "drift_share"), window(1, "drift_share")]
    decision = run(history, active=1)
    assert decision.action == "none"
    assert "already one retraining active (at most 1)" in decision.reason
    both = run(history, active=1, last=history[-1].end)
    assert "already one retraining active" in both.reason and "cooldown until" in both.reason


def test_missing_labels_never_count_as_a_performance_breach() -> None:
    history = [window(0, "performance", labels=5), window(1, "performance", labels=99)]
    decision = run(history)
    assert decision.action == "none"
    assert decision.reason.startswith("latest window w001 not breached")
    assert decision.evidence["labels_missing"] == ["w000", "w001"]
    assert [w["breaches"] for w in decision.evidence["windows"]] == [["performance"]] * 2
    labelled = [window(0, "performance", labels=100), window(1, "performance", labels=500)]
    assert run(labelled).action == "retrain"


def test_only_configured_trigger_kinds_count() -> None:
    history = [window(0, "quality:missing:age"), window(1, "quality:missing:age")]
    assert run(history).action == "none"
    with_quality = MonitoringConfig(policy={"k": 2, "n": 3, "triggers": ["quality"]})
    assert run(history, with_quality).action == "retrain"
    record = window(0, "drift_share", "quality:missing:age", "prediction_drift")
    assert counted_breaches(record, CONFIG) == ["drift_share", "prediction_drift"]


def test_a_repeated_run_for_a_retraining_window_keeps_the_decision() -> None:
    history = [window(0, "drift_share"),
               window(1, "drift_share", decision="retrain", reason="2 of last 3 windows")]
    decision = run(history, active=1, last=history[-1].end)  # its own run is now active
    assert decision.action == "retrain"
    assert decision.reason == "already decided for this window: 2 of last 3 windows"
    assert decision.dedup_key == dedup_key("w001")


def test_dedup_key_is_stable_per_window_and_valid_as_a_run_id() -> None:
    history = [window(0, "drift_share"), window(1, "drift_share")]
    first, second = run(history), run(history, active=1)
    assert first.dedup_key == second.dedup_key == "retrain__w001"
    assert run([window(0)]).dedup_key == "retrain__w000"  # "none" decisions carry it too
    assert dedup_key("2026-04-01T10:00:00+00:00") == "retrain__2026-04-01T10:00:00+00:00"
    for bad in ("", "../x", "a b", "w;drop", "x" * 201):
        with pytest.raises(ValueError, match="window_id"):
            dedup_key(bad)


def test_decide_checks_its_inputs() -> None:
    history = [window(0), window(1)]
    with pytest.raises(ValueError, match="latest window"):
        decide(history, CONFIG, now=T0, last_retraining_at=None, active_retrainings=0,
               window_id="w000")
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(history, CONFIG, now=T0.replace(tzinfo=None), last_retraining_at=None,
               active_retrainings=0, window_id="w001")
    with pytest.raises(ValueError, match="latest window"):
        decide([], CONFIG, now=T0, last_retraining_at=None, active_retrainings=0,
               window_id="w001")


# --- recorded windows are judged again under the current config ------------------------------

def recorded(store: MonitoringStore, i: int, *, drift_share: float) -> None:
    """Record window ``i`` with the breaches its numbers meet under CONFIG (0.3)."""
    start = T0 + dt.timedelta(hours=i)
    store.record_window("churn", WindowReport(
        window_id=f"w{i:03d}", start=start, end=start + dt.timedelta(hours=1), rows=1000,
        sampled=500, columns={"sessions": ColumnDriftResult("wasserstein", 0.1, 0.2, True),
                              "plan": ColumnDriftResult("jensenshannon", 0.1, 0.01, False)},
        drift_share=drift_share, prediction_drift=None, quality={}, performance=None,
        label_count=0, breaches=["drift_share"] if drift_share >= 0.3 else []),
        created=start + dt.timedelta(hours=1))


def with_max_drift_share(share: float) -> MonitoringConfig:
    """CONFIG with another ``policy.max_drift_share``."""
    return MonitoringConfig(**{**CONFIG.model_dump(),
                               "policy": {**CONFIG.policy.model_dump(), "max_drift_share": share}})


def test_a_changed_threshold_changes_the_decision_on_recorded_windows(tmp_path: Path) -> None:
    store = MonitoringStore(tmp_path)
    for i in range(2):
        recorded(store, i, drift_share=0.4)
    history = store.history("churn", 3)
    assert [r.breaches for r in history] == [("drift_share",)] * 2  # as recorded under 0.3
    now = history[-1].end
    under_recorded = decide(history, CONFIG, now=now, last_retraining_at=None,
                            active_retrainings=0, window_id="w001")
    assert under_recorded.action == "retrain"

    laxer = with_max_drift_share(0.5)
    decision = decide(history, laxer, now=now, last_retraining_at=None, active_retrainings=0,
                      window_id="w001")
    assert decision.action == "none"
    assert decision.reason == "latest window w001 not breached (0 of last 3 windows breached)"
    latest = decision.evidence["windows"][-1]
    assert (latest["breaches"], latest["recorded_breaches"]) == ([], ["drift_share"])

    # A stricter threshold turns a recorded calm window into a breached one.
    recorded(store, 2, drift_share=0.25)
    stricter = with_max_drift_share(0.2)
    history = store.history("churn", 3)
    assert history[-1].breaches == ()
    assert decide(history, CONFIG, now=now, last_retraining_at=None, active_retrainings=0,
                  window_id="w002").action == "none"
    assert decide(history, stricter, now=now, last_retraining_at=None, active_retrainings=0,
                  window_id="w002").action == "retrain"


def test_a_record_without_numbers_keeps_its_recorded_breaches() -> None:
    bare = window(0, "drift_share")
    assert judged_breaches(bare, CONFIG) == ("drift_share",)
    measured = WindowRecord(window_id="w000", start=bare.start, end=bare.end,
                            breaches=("drift_share",), numbers=WindowNumbers(drift_share=0.1))
    assert judged_breaches(measured, CONFIG) == ()
    assert counted_breaches(measured, CONFIG) == []


# --- config ----------------------------------------------------------------------------------

def test_defaults_are_explicit_methods() -> None:
    config = MonitoringConfig()
    assert (config.schedule, config.window_minutes, config.sample_size) == ("@hourly", 60, 5000)
    assert config.drift.test_for("x", "numeric").model_dump() == {"method": "wasserstein",
                                                                  "threshold": 0.1}
    assert config.drift.test_for("x", "categorical").model_dump() == {
        "method": "jensenshannon", "threshold": 0.1}
    custom = MonitoringConfig(drift={"columns": {
        "a": {"method": "psi", "threshold": 0.2}, "b": {"threshold": 0.3, "critical": True}}})
    assert custom.drift.test_for("a", "numeric").method == "psi"
    assert custom.drift.test_for("b", "numeric").model_dump() == {"method": "wasserstein",
                                                                  "threshold": 0.3}
    assert custom.drift.critical_columns == ["b"]
    assert config.policy.max_active_retrainings == 1


@pytest.mark.parametrize(("data", "message"), [
    ({"policy": {"k": 4, "n": 3}}, "k (4) must not exceed n (3)"),
    ({"schedule": "@daily", "window_minutes": 60}, "must equal the interval"),
    ({"schedule": "@once"}, "does not define windows"),
    ({"drift": {"columns": {"a": {"method": "psi"}}}}, "needs an explicit threshold"),
    ({"drift": {"columns": {"a": {"method": "ks", "threshold": 1.5}}}}, "significance level"),
    ({"drift": {"default": {"categorical": {"method": "wasserstein", "threshold": 0.1}}}},
     "does not apply to categorical"),
    ({"drift": {"prediction": {"method": "chisquare", "threshold": 0.05}}}, "predictions are"),
    ({"performance": {"metric": "roc_auc", "max": 0.7}}, "set min, not max"),
    ({"performance": {"metric": "rmse"}}, "needs max"),
    ({"performance": {"min": 0.7}}, "min/max need a metric"),
    ({"policy": {"max_drift_share": 0}}, "greater than 0"),
    ({"sample_size": 5000, "strata": 6000}, "strata"),
    ({"unknown": 1}, "Extra inputs"),
])
def test_inconsistent_configs_are_refused_with_a_clear_error(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        MonitoringConfig.model_validate(data)


def test_config_is_checked_against_the_spec() -> None:
    spec = parse_spec({
        "name": "demo", "task": "regression", "source": {"kind": "simulator"},
        "entity_key": "id", "timestamp": "ts", "label": "y",
        "features": [{"name": "a", "type": "numeric"}, {"name": "c", "type": "categorical"}],
        "estimator": {"class_path": "sklearn.linear_model.Ridge"},
        "gates": {"primary_metric": "rmse"},
    })
    validate_against_spec(MonitoringConfig(performance={"metric": "rmse", "max": 3}), spec)
    config = MonitoringConfig(
        drift={"columns": {"zz": {"critical": True}, "c": {"method": "ks", "threshold": 0.05}}},
        quality={"columns": {"qq": {"max_missing_share": 0.5}}},
        performance={"metric": "roc_auc", "min": 0.7},
    )
    with pytest.raises(ValueError) as error:
        validate_against_spec(config, spec)
    text = str(error.value)
    assert "monitoring.drift.columns.zz: not a model input" in text
    assert "monitoring.drift.columns.c: 'ks' does not apply to categorical" in text
    assert "monitoring.quality.columns.qq: not a model input" in text
    assert "'roc_auc' is not a regression metric" in text
    reserved = spec.model_copy(update={"features": [
        *spec.features, spec.features[0].model_copy(update={"name": "prediction"})]})
    with pytest.raises(ValueError, match="'prediction': the name is reserved"):
        validate_against_spec(MonitoringConfig(), reserved)
