"""``training.refit``: after the gates bless a challenger on the held-out rows, the registered
(and so deployed) model is the same estimator fitted on every labelled row of the batch.

The stage functions run on the simulator with MLflow embedded on SQLite in a temporary folder,
as the DAG calls them: ingest → preprocess → train → validate_model → register. Every test
uses its own pipeline name (experiment and registered model).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from airmlops import stages
from airmlops.contracts import Snapshot
from airmlops.model_files import load_registered_model
from airmlops.monitoring.estimation import load_run_calibration
from airmlops.monitoring.policy import dedup_key
from airmlops.settings import Settings
from airmlops.spec import PipelineSpec, parse_spec, resolve_estimator
from airmlops.training import refit
from airmlops.training.model import build_pipeline, feature_frame, label_array, predict_scores

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 9, 15, 14, 30, tzinfo=dt.UTC)
RETRAINING = dedup_key("2026-09-15T13:00:00+00:00")  # the run id monitoring triggers
SCHEDULED = "scheduled__2026-09-15T00:00:00+00:00"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("refit")
    return {"settings": Settings(data_root=root / "data",
                                 mlflow_tracking_uri=f"sqlite:///{root}/mlflow.db"),
            "artifacts": (root / "artifacts").as_uri()}


def _spec(name: str, refit_setting: bool | None = None, **gates: Any) -> PipelineSpec:
    """The demo pipeline, small: 150 customers, two weeks, a two-day embargo, no store."""
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    data.pop("feature_store")
    data["name"] = name
    data["source"].update(customers=150, label_delay_days=0)
    data["training"].update(window_days=14, gap_days=2, min_rows=50, test_fraction=0.25,
                            refit=refit_setting)
    data["gates"].update({"thresholds": {"roc_auc": 0.55}, **gates})
    data["gates"]["champion"].update(max_regression=0.2, n_bootstrap=200)
    return parse_spec(data)


def _run(spec: PipelineSpec, run_id: str, as_of: dt.datetime = NOW) -> stages.RunContext:
    return stages.RunContext(dag_id=spec.training_dag_id, run_id=run_id, as_of=as_of,
                             git_commit="0" * 40, trigger_reason=f"test {run_id}")


def _train_and_gate(spec: PipelineSpec, run: stages.RunContext,
                    home: dict[str, Any]) -> dict[str, Any]:
    """What the DAG does up to the gates; the experiment keeps its artifacts in the test's
    folder."""
    from mlflow import MlflowClient

    from airmlops.training.tracking import get_or_create_experiment

    settings = home["settings"]
    get_or_create_experiment(MlflowClient(settings.mlflow_tracking_uri), spec.name,
                             f"{home['artifacts']}/{spec.name}")
    snapshot = stages.ingest(spec, run, settings)
    training_set = stages.preprocess(spec, snapshot, settings)
    trained = stages.train(spec, training_set, run, settings)
    decision = stages.validate_model(spec, trained, settings)
    return {"snapshot": snapshot, "training_set": training_set, "trained": trained,
            "decision": decision}


def _labelled_batch(spec: PipelineSpec, snapshot: Snapshot) -> pd.DataFrame:
    """Every labelled row of the batch, from the snapshot, in the split's time order."""
    from airmlops.data import snapshots

    frame = snapshots.read_snapshot(snapshot.ref)
    frame = frame.loc[frame[spec.label].notna() & frame[spec.timestamp].notna()]
    return frame.sort_values([spec.timestamp, spec.entity_key],
                             kind="mergesort").reset_index(drop=True)


def _client(home: dict[str, Any]):
    from mlflow import MlflowClient

    uri = home["settings"].mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _scores(spec: PipelineSpec, model_uri: str, rows: pd.DataFrame,
            home: dict[str, Any]) -> np.ndarray:
    model = load_registered_model(model_uri, home["settings"].mlflow_tracking_uri)
    return predict_scores(spec, model, rows)


def _refit_models(home: dict[str, Any], run_id: str) -> list:
    client = _client(home)
    run = client.get_run(run_id)
    return list(client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{refit.REFIT_MODEL_NAME}'"))


@pytest.mark.parametrize(("setting", "run_id", "reason"), [
    (None, RETRAINING, refit.REASON_RETRAINING),
    (None, SCHEDULED, None),
    (None, "manual__2026-09-15T10:00:00+00:00", None),
    (None, "retrain__", None),  # no window: not what the monitoring DAG sends
    (None, None, None),
    (True, SCHEDULED, refit.REASON_SPEC),
    (True, RETRAINING, refit.REASON_SPEC),
    (False, RETRAINING, None),
    (False, SCHEDULED, None),
])
def test_refit_applies_to_retraining_runs_unless_the_spec_says(setting, run_id, reason):
    spec = _spec("refit_rules", setting)
    assert refit.refit_reason(spec, run_id) == reason


def test_a_retraining_registers_the_blessed_model_refit_on_every_labelled_row(home, tmp_path):
    spec = _spec("refit_retraining")
    settings, client = home["settings"], _client(home)
    name = spec.registered_model_name

    # A week earlier, a scheduled run (refit unset, not a retraining): the held-out fit is
    # registered as it is, and becomes the champion.
    earlier = _train_and_gate(spec, _run(spec, SCHEDULED, NOW - dt.timedelta(days=7)), home)
    assert earlier["decision"].blessed
    first = stages.register(spec, earlier["trained"], settings)
    assert first.refit is False
    champion = client.get_model_version(name, first.version)
    assert champion.source == earlier["trained"].model_uri
    assert "refit" not in champion.tags
    _set_champion(name, first.version, settings)

    # The retraining: gated on its held-out rows against that champion, then refit.
    now = _train_and_gate(spec, _run(spec, RETRAINING), home)
    trained, decision = now["trained"], now["decision"]
    assert decision.blessed and decision.comparison is not None
    registered = stages.register(spec, trained, settings)
    assert registered.refit is True

    batch = _labelled_batch(spec, now["snapshot"])
    split = now["training_set"].split
    assert split["embargoed_rows"] > 0  # so the refit's rows include the embargoed ones
    assert len(batch) == split["train_rows"] + split["embargoed_rows"] + split["test_rows"]

    version = client.get_model_version(name, registered.version)
    run = client.get_run(trained.run_id)
    assert version.tags["refit"] == run.data.tags["refit"] == "true"
    assert version.tags["refit.reason"] == refit.REASON_RETRAINING
    assert version.tags["refit.rows"] == run.data.tags["refit.rows"] == str(len(batch))
    assert version.tags["heldout.fit_rows"] == str(split["train_rows"])
    assert version.tags["refit.data_end"] == batch[spec.timestamp].max().isoformat()
    assert version.tags["heldout.model_uri"] == trained.model_uri
    assert version.tags["refit.model_uri"] == version.source != trained.model_uri
    assert version.run_id == trained.run_id == version.tags["mlflow_run_id"]
    # Its calibration (monitoring's estimate reads it from the run) is the held-out fit's: the
    # refit has no unseen rows left to be calibrated on.
    calibration = load_run_calibration(version.run_id, settings.mlflow_tracking_uri)
    assert calibration is not None and calibration.rows == split["test_rows"]
    assert trained.model_uri in calibration.fitted_on
    # The version's digests are the refit's files, not the held-out model's.
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.name == refit.REFIT_MODEL_NAME
    assert version.tags["model_sha256"] == logged.tags["model_sha256"]
    assert version.tags["model_sha256"] != run.data.tags["model_sha256"]

    # The registered model learned from every labelled row: not the held-out fit, and the
    # same as the spec's estimator fitted offline on those rows.
    test_rows = pd.read_parquet(trained.test_path)
    deployed = _scores(spec, registered.model_uri, test_rows, home)
    assert not np.allclose(deployed, _scores(spec, trained.model_uri, test_rows, home))
    offline = build_pipeline(spec, resolve_estimator(spec)).fit(
        feature_frame(spec, batch), label_array(spec, batch))
    np.testing.assert_array_equal(deployed, predict_scores(spec, offline, test_rows))

    # The gates' numbers are those of the held-out comparison, and stay on the run.
    assert run.data.tags["model_uri"] == trained.model_uri  # the run's model: the gated one
    assert {k.removeprefix("test_"): v for k, v in run.data.metrics.items()
            if k.startswith("test_")} == pytest.approx(trained.metrics)
    local = client.download_artifacts(trained.run_id, "gate_decision.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == decision.to_xcom()
    assert run.data.metrics["gate_delta"] == pytest.approx(decision.comparison["delta"])
    assert version.tags["gate_blessed"] == "true"
    from airmlops.training.gates import evaluate_against_champion

    heldout_comparison = evaluate_against_champion(
        spec, test_rows, trained.model_uri, f"models:/{name}/{first.version}",
        tracking_uri=settings.mlflow_tracking_uri)
    assert heldout_comparison.delta == pytest.approx(decision.comparison["delta"])
    assert any(key.startswith("refit_train_") for key in run.data.metrics)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"train", "test", "labelled"}

    # A retried register reuses the refit and the version: nothing is fitted or logged again.
    again = stages.register(spec, trained, settings)
    assert again == registered
    assert len(_refit_models(home, trained.run_id)) == 1
    assert client.get_run(trained.run_id).info.status == "FINISHED"


def _set_champion(name: str, version: str, settings: Settings) -> None:
    from airmlops.training import registry

    registry.set_alias(name, registry.CHAMPION, version, settings.mlflow_tracking_uri)


def test_refit_false_registers_exactly_the_model_the_gates_measured(home):
    spec = _spec("refit_off", refit_setting=False)
    gated = _train_and_gate(spec, _run(spec, RETRAINING), home)
    trained = gated["trained"]
    assert gated["decision"].blessed
    registered = stages.register(spec, trained, home["settings"])

    version = _client(home).get_model_version(spec.registered_model_name, registered.version)
    assert registered.refit is False and "refit" not in version.tags
    assert version.source == trained.model_uri
    run = _client(home).get_run(trained.run_id)
    assert version.tags["model_sha256"] == run.data.tags["model_sha256"]
    assert not any(key.startswith("refit") for key in run.data.tags)
    assert _refit_models(home, trained.run_id) == []
    test_rows = pd.read_parquet(trained.test_path)
    np.testing.assert_array_equal(_scores(spec, registered.model_uri, test_rows, home),
                                  _scores(spec, trained.model_uri, test_rows, home))

    # That blessed run cannot be refit with another estimator, or from another batch.
    changed = _spec("refit_off", refit_setting=True).model_copy(
        update={"estimator": spec.estimator.model_copy(update={"params": {"C": 0.01}})})
    with pytest.raises(refit.RefitError, match=r"estimator\.C"):
        refit.refit_run(changed, trained.run_id, trained.train_path,
                        reason=refit.REASON_SPEC,
                        tracking_uri=home["settings"].mlflow_tracking_uri)
    with pytest.raises(refit.RefitError, match="was not trained on"):
        refit.refit_run(spec, trained.run_id, trained.test_path,
                        reason=refit.REASON_SPEC,
                        tracking_uri=home["settings"].mlflow_tracking_uri)
    assert _refit_models(home, trained.run_id) == []

    # A retried register after the spec turned refit on cannot swap the version's files.
    turned_on = _spec("refit_off", refit_setting=True)
    with pytest.raises(ValueError, match="was registered from model"):
        stages.register(turned_on, trained, home["settings"])
    version = _client(home).get_model_version(spec.registered_model_name, registered.version)
    assert version.source == trained.model_uri and "refit" not in version.tags


def test_a_refused_challenger_is_not_refit(home):
    spec = _spec("refit_refused", refit_setting=True, thresholds={"roc_auc": 0.999})
    gated = _train_and_gate(spec, _run(spec, RETRAINING), home)
    trained = gated["trained"]
    assert not gated["decision"].blessed

    assert stages.refit_blessed(spec, trained, home["settings"]) is None
    assert _refit_models(home, trained.run_id) == []
    run = _client(home).get_run(trained.run_id)
    assert run.data.tags["gate_blessed"] == "false"
    assert not any(key.startswith("refit") for key in run.data.tags)


def test_the_labelled_set_is_every_labelled_row_of_the_batch(home):
    from airmlops.training.dataset import read_labelled_set

    spec = _spec("refit_labelled")
    settings = home["settings"]
    snapshot = stages.ingest(spec, _run(spec, SCHEDULED), settings)
    training_set = stages.preprocess(spec, snapshot, settings)
    rows = read_labelled_set(training_set.train_path)
    batch = _labelled_batch(spec, snapshot)
    assert len(rows) == len(batch)
    pd.testing.assert_series_equal(rows[spec.entity_key], batch[spec.entity_key])
    assert rows[spec.timestamp].is_monotonic_increasing

    embargoed = Path(training_set.train_path).with_name("embargoed.parquet")
    embargoed.unlink()
    with pytest.raises(ValueError, match=r"embargoed rows but has no embargoed\.parquet"):
        read_labelled_set(training_set.train_path)


def test_a_refit_champion_is_never_judged_on_rows_it_was_fitted_on(home):
    """The next retraining after a refit champion: its held-out rows are mostly before the
    champion's data end, so the champion's held-out fit (which saw none of them) stands in."""
    from airmlops.training import gates

    spec = _spec("refit_next_comparison")
    settings, client = home["settings"], _client(home)
    name = spec.registered_model_name
    earlier = _train_and_gate(spec, _run(spec, SCHEDULED, NOW - dt.timedelta(days=7)), home)
    _set_champion(name, stages.register(spec, earlier["trained"], settings).version,
                  settings)
    retrained = _train_and_gate(spec, _run(spec, RETRAINING), home)
    refit_version = stages.register(spec, retrained["trained"], settings).version
    _set_champion(name, refit_version, settings)
    champion_tags = client.get_model_version(name, refit_version).tags

    later = NOW + dt.timedelta(days=1)
    following = _train_and_gate(
        spec, _run(spec, dedup_key("2026-09-16T13:00:00+00:00"), later), home)
    test_rows = pd.read_parquet(following["trained"].test_path)
    seen = pd.to_datetime(test_rows[spec.timestamp], utc=True) <= pd.Timestamp(
        champion_tags["refit.data_end"])
    assert seen.mean() > 0.5  # most of them: the refit champion would look better than it is
    uri, rows, basis = gates.unseen_by_champion(
        spec, test_rows, f"models:/{name}/{refit_version}", champion_tags)
    assert uri == champion_tags["heldout.model_uri"] and len(rows) == len(test_rows)
    assert "stands in" in basis
    expected = gates.evaluate_against_champion(
        spec, test_rows, following["trained"].model_uri, uri,
        tracking_uri=settings.mlflow_tracking_uri)
    assert following["decision"].comparison["delta"] == pytest.approx(expected.delta)


@pytest.mark.parametrize(("after", "expected_uri", "expected_rows", "words"), [
    (None, "models:/m/2", 300, None),  # not a refit champion: compared as it is
    ("2026-09-01T00:00:00+00:00", "models:/m/2", 203, "after that"),  # 203 unseen rows
    ("2026-09-02T20:00:00+00:00", "models:/m-heldout", 300, "stands in"),  # too few
])
def test_the_champion_comparison_uses_rows_the_champion_never_saw(after, expected_uri,
                                                                  expected_rows, words):
    from airmlops.training import gates

    spec = _spec("refit_rows")
    times = pd.date_range("2026-08-31T00:00:00Z", periods=300, freq="15min")
    test_rows = pd.DataFrame({spec.timestamp: times})
    tags = {} if after is None else {"refit.data_end": after,
                                     "heldout.model_uri": "models:/m-heldout"}
    uri, rows, basis = gates.unseen_by_champion(spec, test_rows, "models:/m/2", tags)
    assert (uri, len(rows)) == (expected_uri, expected_rows)
    assert (basis is None) if words is None else (words in basis)
    if after is not None and expected_uri == "models:/m/2":
        assert (rows[spec.timestamp] > pd.Timestamp(after)).all()
