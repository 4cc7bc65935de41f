"""The pipeline spec: valid specs load, every bad field gives an error naming file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from airmlops.spec import SpecError, load_spec, parse_spec, resolve_estimator

DEMO = Path(__file__).resolve().parents[2] / "include" / "pipelines" / "churn.yaml"


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def _error_for(tmp_path: Path, data: dict) -> SpecError:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as caught:
        spec = load_spec(path)
        resolve_estimator(spec, path)
    assert str(path) in str(caught.value)
    return caught.value


def test_demo_spec_loads_and_resolves():
    spec = load_spec(DEMO)
    assert spec.training_dag_id == "churn_training"
    assert spec.required_columns[:3] == ["customer_id", "event_timestamp", "churned"]
    assert resolve_estimator(spec).__name__ == "LogisticRegression"


def test_spec_hash_ignores_formatting_but_not_content(demo):
    again = parse_spec(copy.deepcopy(demo))
    assert again.spec_hash() == parse_spec(demo).spec_hash()
    demo["estimator"]["params"]["C"] = 0.5
    assert parse_spec(demo).spec_hash() != again.spec_hash()


def test_missing_label_column_is_named(tmp_path, demo):
    del demo["label"]
    assert ("label", "is required") in _error_for(tmp_path, demo).problems


def test_unknown_estimator_class_is_named(tmp_path, demo):
    demo["estimator"]["class_path"] = "sklearn.linear_model.LogisticRegresion"
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "estimator.class_path"
    assert "listed by sklearn.utils.all_estimators" in error.problems[0][1]
    assert "did you mean LogisticRegression" in error.problems[0][1]


def test_non_sklearn_estimator_is_refused(tmp_path, demo):
    demo["estimator"]["class_path"] = "os.system"
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "estimator.class_path"
    assert "scikit-learn classifier or regressor" in error.problems[0][1]


def test_regressor_for_a_classification_task_is_refused(tmp_path, demo):
    demo["estimator"] = {"class_path": "sklearn.linear_model.Ridge", "params": {}}
    assert "is not a classifier" in str(_error_for(tmp_path, demo))


def test_wrong_type_names_field_and_value(tmp_path, demo):
    demo["features"][2]["min"] = "eighteen"
    error = _error_for(tmp_path, demo)
    field, message = error.problems[0]
    assert field == "features[2].min"
    assert "valid number" in message and "'eighteen'" in message


def test_unknown_field_and_bad_enum(tmp_path, demo):
    demo["sourc"] = {}
    demo["task"] = "multiclass"
    fields = dict(_error_for(tmp_path, demo).problems)
    assert fields["sourc"] == "is not a known field"
    assert "binary_classification" in fields["task"]


def test_gate_metric_must_fit_the_task(tmp_path, demo):
    demo["gates"]["primary_metric"] = "rmse"
    assert "not a binary_classification metric" in str(_error_for(tmp_path, demo))


def test_label_cannot_also_be_a_feature(tmp_path, demo):
    demo["features"].append({"name": "churned", "type": "numeric"})
    assert "must not also be a feature" in str(_error_for(tmp_path, demo))


def test_sql_source_must_bind_the_interval(tmp_path, demo):
    demo["source"] = {"kind": "sql", "conn_id": "warehouse", "query": "SELECT * FROM t"}
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "source.query"


def test_file_source_cannot_escape_the_data_root(tmp_path, demo):
    demo["source"] = {"kind": "file", "path": "../../etc/*.csv"}
    assert "must not contain '..'" in str(_error_for(tmp_path, demo))


def test_invalid_yaml_and_non_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    path.write_text("- a list")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path)


def test_feature_store_inputs_and_types(demo):
    spec = parse_spec(demo)
    types = spec.input_types
    assert types["tenure_days"] == "numeric"
    assert types["profile__plan"] == "categorical"
    assert types["activity__sessions_sum_7d"] == "numeric"
    assert types["minutes_per_session"] == "numeric"
    assert "sessions" not in types, "raw columns are not inputs when a feature store is declared"
    assert spec.request_fields == ["tenure_days"]
    assert spec.features_dag_id == "churn_features"


def test_feature_store_changes_the_features_hash(demo):
    before = parse_spec(copy.deepcopy(demo)).features_hash()
    demo["feature_store"]["views"][0]["ttl_days"] = 3
    assert parse_spec(demo).features_hash() != before


def test_events_views_need_events_for_file_sources(tmp_path, demo):
    demo["source"] = {"kind": "file", "path": "raw/*.csv"}
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "feature_store.events_path"
    assert "{" not in error.problems[0][1], "the message must not dump the whole spec"


def test_request_fields_must_be_declared_features(tmp_path, demo):
    demo["feature_store"]["request_fields"] = ["nonexistent"]
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "feature_store.request_fields"


def test_unknown_on_demand_function_is_named(tmp_path, demo):
    demo["feature_store"]["on_demand"][0]["function"] = "rm_rf"
    assert "not a registered on-demand function" in str(_error_for(tmp_path, demo))


def test_model_inputs_must_exist(tmp_path, demo):
    demo["model_inputs"] = ["tenure_days", "ghost"]
    error = _error_for(tmp_path, demo)
    assert error.problems[0] == ("model_inputs", "unknown column(s) ['ghost']")


def test_the_estimator_catalog_matches_the_installed_scikit_learn():
    """The parse-time allow-list is what all_estimators says; regenerate it after an upgrade
    with ``python -m airmlops.estimators``."""
    from airmlops import estimators

    assert estimators.catalog() == estimators.build_catalog()["estimators"]


def test_params_are_checked_against_the_estimator_signature(tmp_path, demo):
    demo["estimator"]["params"] = {"C": 0.5, "filename": "/tmp/x"}
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "estimator.params.filename"
    assert "not a parameter of LogisticRegression" in error.problems[0][1]


def test_param_values_are_checked_by_scikit_learn_before_training(tmp_path, demo):
    demo["estimator"]["params"] = {"C": -1.0}
    error = _error_for(tmp_path, demo)
    assert error.problems[0][0] == "estimator.params" and "'C' parameter" in error.problems[0][1]


def test_resolve_estimator_checks_identity_not_the_catalog(demo):
    """A class path the catalog let through still has to be one of all_estimators' classes."""
    spec = parse_spec(demo)
    forged = spec.model_copy(update={"estimator": spec.estimator.model_copy(
        update={"class_path": "sklearn.utils._testing.MinimalClassifier"})})
    with pytest.raises(SpecError, match=r"estimator\.class_path: .* is not a scikit-learn "
                                        "classifier"):
        resolve_estimator(forged)


@pytest.mark.parametrize("schedule, ok", [
    ("@daily", True), ("@once", True), ("0 3 * * *", True), ("*/15 * * * 1-5", True),
    ("every day", False), ("@sometimes", False), ("61 * * * *", False),
    ("0 0 * * * *", False), ("* * *", False),
])
def test_schedules_are_presets_or_five_field_cron(demo, schedule, ok):
    demo["schedule"] = schedule
    if ok:
        assert parse_spec(demo).schedule == schedule
    else:
        with pytest.raises(SpecError) as error:
            parse_spec(demo)
        assert error.value.problems[0][0] == "schedule"


@pytest.mark.parametrize("text, expected", [
    ("name: &a churn\nowner: *a\n", "anchors and aliases"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32"),
    ("name: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_yaml_without_aliases_tags_or_deep_nesting(tmp_path, text, expected):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected):
        load_spec(path)


def test_oversized_and_non_utf8_files_are_spec_errors(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"name: churn\n" + b"#" * 300_000)
    with pytest.raises(SpecError, match="larger than 256 KiB"):
        load_spec(path)
    path.write_bytes(b"name: ch\xffurn\n")
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte 0xff at offset 8\)"):
        load_spec(path)


def test_file_paths_stay_inside_the_data_roots(tmp_path, demo):
    root, extra, outside = tmp_path / "root", tmp_path / "extra", tmp_path / "outside"
    for folder in (root, extra, outside):
        folder.mkdir()
    (root / "link").symlink_to(outside)
    demo["source"] = {"kind": "file", "path": "raw/*.csv"}
    demo["feature_store"]["events_path"] = str(extra / "events/*.csv")
    demo["feature_store"]["profiles_path"] = "profiles/*.parquet"
    assert parse_spec(demo, data_roots=[root, extra]).source.path == "raw/*.csv"
    for field, value in [("source.path", "/etc/passwd"), ("source.path", "link/*.csv"),
                         ("feature_store.events_path", str(outside / "*.csv")),
                         ("feature_store.profiles_path", "../outside/p.csv")]:
        bad = copy.deepcopy(demo)
        if field == "source.path":
            bad["source"]["path"] = value
        else:
            bad["feature_store"][field.split(".")[1]] = value
        with pytest.raises(SpecError) as error:
            parse_spec(bad, data_roots=[root, extra])
        assert error.value.problems[0][0] == field, error.value
