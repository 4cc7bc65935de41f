"""Acceptance of the label-free estimate (CBPE) on the simulator, through the platform's code.

The churn pipeline (its features, estimator and split; without the feature store, so the model
reads the simulator's observation columns) is trained on the stable world with
:func:`airmlops.training.tracking.train_and_log`, which calibrates it on the held-out rows and
logs ``calibration.json``; the model is registered and made champion, and each drifted window's
estimate comes from :func:`airmlops.monitoring.estimation.estimate_window`, as the monitoring
report computes it. MLflow runs embedded on SQLite in a temporary folder: no server.

Window size: 20 000 customers, each observed once a week, so a weekly window holds ~18 000
predictions. The realized ROC AUC of a window is itself a sample: with the demo's 2 000
customers (~1 800 rows a window) it varies by ~0.012 (one standard error) around the model's
true AUC, and the estimate missed the realized value by up to 0.02 in stable windows.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from airmlops.data.simulator import simulate_observations
from airmlops.model_files import load_registered_model
from airmlops.monitoring.estimation import estimate_window, load_run_calibration
from airmlops.spec import parse_spec
from airmlops.training import registry
from airmlops.training.dataset import time_partition, write_training_set
from airmlops.training.model import predict_scores
from airmlops.training.tracking import train_and_log

CHURN_SPEC = Path(__file__).resolve().parents[2] / "include" / "pipelines" / "churn.yaml"
CUSTOMERS = 20_000
TRAINED_UNTIL = dt.date(2026, 6, 1)
WINDOWS = 4
WINDOW_DAYS = 7
TOLERANCE = 0.02


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """The churn model trained on 120 stable days, registered and aliased champion."""
    raw = yaml.safe_load(CHURN_SPEC.read_text(encoding="utf-8"))
    raw.pop("feature_store")
    raw["name"] = "churn_estimate"
    raw["source"]["customers"] = CUSTOMERS
    spec = parse_spec(raw)
    home = tmp_path_factory.mktemp("estimate")
    uri = f"sqlite:///{home}/mlflow.db"
    start = TRAINED_UNTIL - dt.timedelta(days=spec.training.window_days)
    train, embargoed, test, split = time_partition(
        simulate_observations(spec.source, start, TRAINED_UNTIL), spec)
    paths = write_training_set(train, test, home / "sets", "churn", split=split,
                               embargoed=embargoed)
    result = train_and_log(spec, paths["train"], paths["test"], lineage={}, tracking_uri=uri,
                           data_digest="sha256-" + "cd" * 32,
                           artifact_location=(home / "artifacts").as_uri())
    version = registry.register_challenger(spec, result, uri, {})
    registry.set_alias(spec.registered_model_name, registry.CHAMPION, version.version, uri)
    found = registry.get_alias_version(spec.registered_model_name, registry.CHAMPION, uri)
    model = load_registered_model(version.model_uri, uri)
    return {"spec": spec, "uri": uri, "version": found, "model": model, "result": result,
            "test_rows": split.test_rows}


def _windows(champion: dict, scenario: str) -> list[dict[str, float]]:
    """Each weekly window after training in ``scenario``: its estimated and realized AUC."""
    spec, version = champion["spec"], champion["version"]
    measured = []
    for index in range(WINDOWS):
        start = TRAINED_UNTIL + dt.timedelta(days=WINDOW_DAYS * index)
        rows = simulate_observations(spec.source, start, start + dt.timedelta(days=WINDOW_DAYS),
                                     scenario=scenario)
        scores = predict_scores(spec, champion["model"], rows)
        logged = pd.DataFrame({"model_version": str(version.version), "prediction": scores})
        estimate, note = estimate_window(logged, version, champion["uri"], 0.5)
        assert estimate is not None, note
        assert estimate["rows"] == len(rows)
        measured.append({"estimated": estimate["roc_auc"],
                         "realized": roc_auc_score(rows[spec.label], scores)})
    print(scenario, [f"{m['estimated']:.4f}/{m['realized']:.4f}" for m in measured])
    return measured


def test_the_champion_carries_its_held_out_calibration(champion):
    calibration = load_run_calibration(champion["version"].run_id, champion["uri"])
    assert calibration is not None
    assert calibration.rows == champion["test_rows"] > 50_000
    assert champion["result"].model_uri in calibration.fitted_on


def test_the_estimate_follows_the_realized_auc_under_covariate_drift(champion):
    measured = _windows(champion, "covariate_drift")
    misses = [abs(m["estimated"] - m["realized"]) for m in measured]
    assert max(misses) <= TOLERANCE, measured
    # The drift is real: the model is worse than on its held-out rows, and the estimate saw it.
    held_out = champion["result"].metrics["roc_auc"]
    assert all(m["realized"] < held_out - 0.005 and m["estimated"] < held_out - 0.005
               for m in measured), (held_out, measured)


def test_the_estimate_cannot_see_concept_drift(champion):
    measured = _windows(champion, "concept_drift")
    misses = [m["estimated"] - m["realized"] for m in measured]
    # The inputs did not move, so the estimate stays where it was while the model got worse.
    assert max(misses) > TOLERANCE, measured
    assert np.mean(misses) > 0.05, measured


def test_a_version_trained_before_calibrations_gets_no_estimate(champion, tmp_path):
    """A real version whose run has no ``calibration.json`` (as every run logged before this
    change): the estimate is absent, with a note, never an error."""
    from mlflow import MlflowClient

    spec = champion["spec"].model_copy(update={"name": "churn_legacy"})
    uri = champion["uri"]
    frame = simulate_observations(spec.source, dt.date(2026, 3, 1), dt.date(2026, 3, 15))
    train, test = frame.iloc[:-5000], frame.iloc[-5000:]
    paths = write_training_set(train, test, tmp_path, "legacy")
    result = train_and_log(spec, paths["train"], paths["test"], lineage={}, tracking_uri=uri,
                           data_digest="sha256-" + "ef" * 32,
                           artifact_location=(tmp_path / "artifacts").as_uri())
    artifacts = Path(MlflowClient(uri).get_run(result.run_id).info.artifact_uri
                     .removeprefix("file://"))
    (artifacts / "calibration.json").unlink()  # the run as an older release logged it
    version = registry.register_challenger(spec, result, uri, {})
    legacy = MlflowClient(uri, registry_uri=uri).get_model_version(version.name, version.version)
    logged = pd.DataFrame({"model_version": [str(legacy.version)], "prediction": [0.3]})
    estimate, note = estimate_window(logged, legacy, uri, 0.5)
    assert estimate is None and "has no calibration.json" in note
