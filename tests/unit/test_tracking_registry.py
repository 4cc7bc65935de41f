"""Training runs in MLflow (lineage, params, signature, inputs) and the registry (aliases, retries).

MLflow runs embedded on SQLite in a temporary folder: no server. The database is created once
per module (its migrations take seconds) and every test uses its own pipeline name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes

from airmlops.monitoring.estimation import load_run_calibration
from airmlops.spec import parse_spec
from airmlops.training.dataset import time_split, write_training_set
from airmlops.training.registry import (
    CHALLENGER,
    CHAMPION,
    get_alias_version,
    register_challenger,
    set_alias,
)
from airmlops.training.tracking import (
    LINEAGE_TAGS,
    get_or_create_experiment,
    train_and_log,
    using_tracking_uri,
)

LINEAGE = {
    "git_commit": "0123456789abcdef0123456789abcdef01234567",
    "airflow_dag_id": "toy_training",
    "airflow_run_id": "scheduled__2026-04-01T00:00:00+00:00",
    "trigger_reason": "schedule",
}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{home}/mlflow.db", "artifacts": (home / "artifacts").as_uri(),
            "home": home}


def _classification_spec(name, class_path="sklearn.linear_model.LogisticRegression", params=None):
    return parse_spec(
        {
            "name": name,
            "task": "binary_classification",
            "source": {"kind": "file", "path": "toy.parquet"},
            "entity_key": "id",
            "timestamp": "ts",
            "label": "y",
            "features": [
                {"name": "x1", "type": "numeric"},
                {"name": "sessions", "type": "numeric"},
                {"name": "plan", "type": "categorical"},
            ],
            "training": {"test_fraction": 0.25, "gap_days": 3, "min_rows": 100},
            "estimator": {"class_path": class_path, "params": params or {"C": 0.5}},
            "gates": {"primary_metric": "roc_auc"},
        }
    )


def _classification_set(root, key="toy", n=800, seed=0):
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "premium"], n)
    x1 = rng.normal(size=n)
    x1[::50] = np.nan
    y = (rng.random(n) < 1 / (1 + np.exp(-(2 * np.nan_to_num(x1) + (plan == "basic"))))).astype(int)
    frame = pd.DataFrame(
        {
            "id": np.arange(n),
            "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="h"),
            "x1": x1,
            "sessions": rng.integers(0, 30, n),
            "plan": plan,
            "y": y,
        }
    )
    spec = _classification_spec("unused")
    train, test, info = time_split(frame, spec)
    return write_training_set(train, test, root, key, split=info), info


def _train(spec, paths, home, lineage=LINEAGE, **kwargs):
    return train_and_log(
        spec, paths["train"], paths["test"],
        lineage=lineage, tracking_uri=home["uri"], data_digest="sha256-" + "ab" * 32,
        artifact_location=f"{home['artifacts']}/{spec.name}", **kwargs,
    )


@pytest.fixture(scope="module")
def churnish(mlflow_home, tmp_path_factory):
    """One logged classification run, shared by the tests that only read it."""
    spec = _classification_spec("churnish")
    paths, info = _classification_set(tmp_path_factory.mktemp("sets"))
    result = _train(spec, paths, mlflow_home, extra_params={"trigger": "schedule"})
    return spec, paths, info, result


def test_run_carries_every_lineage_tag(churnish, mlflow_home):
    from mlflow import MlflowClient

    spec, _, _, result = churnish
    tags = MlflowClient(mlflow_home["uri"]).get_run(result.run_id).data.tags
    assert set(LINEAGE_TAGS) <= set(tags)
    assert tags["git_commit"] == LINEAGE["git_commit"]
    assert tags["airflow_dag_id"] == "toy_training"
    assert tags["airflow_run_id"] == LINEAGE["airflow_run_id"]
    assert tags["trigger_reason"] == "schedule"
    assert tags["data_digest"] == "sha256-" + "ab" * 32
    assert tags["spec_hash"] == spec.spec_hash()
    assert tags["features_hash"] == spec.features_hash()
    assert not any(key.startswith("lineage.") for key in tags)


def test_run_has_params_and_test_metrics(churnish, mlflow_home):
    from mlflow import MlflowClient

    _, _, info, result = churnish
    run = MlflowClient(mlflow_home["uri"]).get_run(result.run_id)
    params = run.data.params
    assert params["estimator.class_path"] == "sklearn.linear_model.LogisticRegression"
    assert params["estimator.C"] == "0.5"
    assert params["estimator.seed"] == "42"
    assert params["training.gap_days"] == "3"
    assert params["split.cutoff"] == info.cutoff
    assert params["split.train_rows"] == str(info.train_rows)
    assert params["trigger"] == "schedule"
    assert set(result.metrics) == {"roc_auc", "accuracy", "f1", "precision", "recall", "log_loss"}
    for metric, value in result.metrics.items():
        assert run.data.metrics[f"test_{metric}"] == pytest.approx(value)
    assert result.metrics["roc_auc"] > 0.7
    assert run.info.experiment_id == result.experiment_id
    assert run.info.status == "FINISHED"


def test_run_logs_train_and_test_dataset_inputs(churnish, mlflow_home):
    from mlflow import MlflowClient

    _, paths, _, result = churnish
    inputs = MlflowClient(mlflow_home["uri"]).get_run(result.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"train", "test"}
    contexts = {
        name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
        for name, i in by_name.items()
    }
    assert contexts == {"train": "training", "test": "testing"}
    assert len(by_name["train"].dataset.digest) == 32
    assert by_name["train"].dataset.digest != by_name["test"].dataset.digest
    assert paths["train"] in by_name["train"].dataset.source


def test_model_has_signature_input_example_and_loads_back(churnish, mlflow_home, tmp_path):
    import mlflow
    import mlflow.sklearn
    from mlflow.models import Model

    spec, paths, _, result = churnish
    assert result.model_uri.startswith("models:/m-")
    with using_tracking_uri(mlflow_home["uri"]):
        local = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path))
        model = mlflow.sklearn.load_model(result.model_uri)
    meta = Model.load(local)
    assert meta.signature.inputs.input_names() == spec.feature_names
    assert meta.flavors["sklearn"]["serialization_format"] == "skops"
    example = meta.load_input_example(local)
    assert list(example.columns) == spec.feature_names and len(example) == 5
    test = pd.read_parquet(paths["test"])
    assert model.predict_proba(test[spec.feature_names]).shape == (len(test), 2)


def test_experiment_is_named_after_the_pipeline_and_artifacts_stay_put(churnish, mlflow_home):
    from mlflow import MlflowClient

    spec, _, _, result = churnish
    experiment = MlflowClient(mlflow_home["uri"]).get_experiment_by_name(spec.name)
    assert experiment.experiment_id == result.experiment_id
    assert experiment.artifact_location == f"{mlflow_home['artifacts']}/{spec.name}"
    assert any((mlflow_home["home"] / "artifacts" / spec.name).rglob("model.skops"))


def test_a_retry_reuses_the_finished_run_and_a_new_airflow_run_trains_again(
    mlflow_home, tmp_path
):
    from mlflow import MlflowClient

    spec = _classification_spec("retried")
    paths, _ = _classification_set(tmp_path)
    first = _train(spec, paths, mlflow_home)
    retry = _train(spec, paths, mlflow_home)
    assert (retry.run_id, retry.model_uri, retry.reused) == (first.run_id, first.model_uri, True)
    assert retry.metrics == pytest.approx(first.metrics)

    later = _train(spec, paths, mlflow_home, lineage={**LINEAGE, "airflow_run_id": "manual__x"})
    assert later.run_id != first.run_id and not later.reused
    runs = MlflowClient(mlflow_home["uri"]).search_runs([first.experiment_id])
    assert len(runs) == 2


def test_tree_models_are_saved_with_trusted_tree_types(mlflow_home, tmp_path):
    import mlflow.sklearn

    spec = _classification_spec(
        "forest", "sklearn.ensemble.RandomForestClassifier", {"n_estimators": 10, "max_depth": 3}
    )
    paths, _ = _classification_set(tmp_path)
    result = _train(spec, paths, mlflow_home, lineage={})
    with using_tracking_uri(mlflow_home["uri"]):
        model = mlflow.sklearn.load_model(result.model_uri)
    assert model.named_steps["estimator"].random_state == 42
    assert result.metrics["roc_auc"] > 0.7


def test_missing_lineage_is_recorded_as_unknown(mlflow_home, tmp_path):
    from mlflow import MlflowClient

    spec = _classification_spec("no_lineage")
    paths, _ = _classification_set(tmp_path)
    result = _train(spec, paths, mlflow_home, lineage={})
    tags = MlflowClient(mlflow_home["uri"]).get_run(result.run_id).data.tags
    assert tags["git_commit"] == tags["airflow_run_id"] == "unknown"


def test_regression_on_diabetes_with_ridge(mlflow_home, tmp_path):
    from mlflow import MlflowClient

    data = load_diabetes(as_frame=True).frame
    features = [c for c in data.columns if c != "target"]
    data = data.assign(
        id=np.arange(len(data)),
        ts=pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(len(data)), unit="h"),
    )
    spec = parse_spec(
        {
            "name": "diabetes",
            "task": "regression",
            "source": {"kind": "file", "path": "diabetes.csv"},
            "entity_key": "id",
            "timestamp": "ts",
            "label": "target",
            "features": [{"name": c, "type": "numeric"} for c in features],
            "training": {"test_fraction": 0.2, "gap_days": 0, "min_rows": 100},
            "estimator": {"class_path": "sklearn.linear_model.Ridge", "params": {"alpha": 0.1}},
            "gates": {"primary_metric": "rmse", "thresholds": {"r2": 0.2}},
        }
    )
    train, test, info = time_split(data, spec)
    paths = write_training_set(train, test, tmp_path, "diabetes", split=info)
    result = _train(spec, paths, mlflow_home)

    assert set(result.metrics) == {"mae", "rmse", "r2"}
    assert result.metrics["r2"] > 0.2
    assert 0 < result.metrics["mae"] < result.metrics["rmse"]
    metrics = MlflowClient(mlflow_home["uri"]).get_run(result.run_id).data.metrics
    assert metrics["test_rmse"] == pytest.approx(result.metrics["rmse"])
    assert load_run_calibration(result.run_id, mlflow_home["uri"]) is None  # no probabilities


def test_get_or_create_experiment_survives_a_concurrent_create():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    class Experiment:
        experiment_id = "7"
        lifecycle_stage = "active"

    class RacingClient:
        lookups = 0

        def get_experiment_by_name(self, name):
            self.lookups += 1
            return None if self.lookups == 1 else Experiment()

        def create_experiment(self, name, artifact_location=None):
            raise MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS)

    assert get_or_create_experiment(RacingClient(), "toy") == "7"


# --- registry ---------------------------------------------------------------------------------


def test_register_sets_challenger_with_lineage_and_is_idempotent(mlflow_home, tmp_path):
    from mlflow import MlflowClient

    spec = _classification_spec("registered")
    paths, _ = _classification_set(tmp_path)
    result = _train(spec, paths, mlflow_home)
    uri = mlflow_home["uri"]

    first = register_challenger(spec, result, uri, {"gate_blessed": "true", "image_id": None})
    again = register_challenger(spec, result, uri, {"gate_blessed": "true"})  # Airflow retry
    assert again == first
    assert first.to_dict() == {
        "name": "registered", "version": "1", "model_uri": "models:/registered/1"
    }

    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'registered'")) == 1
    version = get_alias_version("registered", CHALLENGER, uri)
    assert str(version.version) == "1"
    assert version.run_id == result.run_id
    for key in (*LINEAGE_TAGS, "trigger_reason"):
        assert version.tags[key] == client.get_run(result.run_id).data.tags[key]
    assert version.tags["mlflow_run_id"] == result.run_id
    assert version.tags["gate_blessed"] == "true"
    assert "image_id" not in version.tags


def test_a_new_run_gets_a_new_version_and_moves_the_alias(mlflow_home, tmp_path):
    spec = _classification_spec("moving")
    paths, _ = _classification_set(tmp_path)
    uri = mlflow_home["uri"]
    first = register_challenger(spec, _train(spec, paths, mlflow_home), uri, {})
    second_run = _train(spec, paths, mlflow_home, lineage={**LINEAGE, "airflow_run_id": "r2"})
    second = register_challenger(spec, second_run, uri, {})

    assert (first.version, second.version) == ("1", "2")
    assert str(get_alias_version("moving", CHALLENGER, uri).version) == "2"
    assert get_alias_version("moving", CHAMPION, uri) is None
    set_alias("moving", CHAMPION, first.version, uri)
    assert str(get_alias_version("moving", CHAMPION, uri).version) == "1"


def test_alias_of_a_missing_model_is_none(mlflow_home):
    assert get_alias_version("never_registered", CHAMPION, mlflow_home["uri"]) is None
