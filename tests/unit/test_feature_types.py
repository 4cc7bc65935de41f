"""Boolean columns and integer-coded categories, through every stage that sees categories.

A CSV column of True/False is read by pandas as booleans, a Parquet one as numpy booleans, a
SQLite query answers 0/1, an integer-coded column with an empty cell comes back as 1.0/2.0.
Validation, training, the compiled scorer, the request models and monitoring must all see one
canonical text of each category (``airmlops.data.categories``): "true"/"false", "1", "2".
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from airmlops.data.categories import BOOLEAN_VALUES, category, category_series
from airmlops.data.validation import summarize_failures, validate_frame
from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.reference import prepare_inputs, summarize_reference
from airmlops.serving.fast_predict import compile_scorer
from airmlops.serving.service import describe_errors, request_models
from airmlops.spec import SpecError, load_spec, parse_spec, resolve_estimator
from airmlops.training.model import build_pipeline, feature_frame, label_array, predict_scores

# --- the canonical text ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (math.nan, None), (np.nan, None), (pd.NA, None), (pd.NaT, None),
    (True, "true"), (False, "false"), (np.True_, "true"), (np.False_, "false"),
    ("true", "true"), ("True", "true"), ("FALSE", "false"), ("fAlSe", "false"),
    (1, "1"), (0, "0"), (-3, "-3"), (np.int64(7), "7"), (np.uint8(2), "2"),
    (1.0, "1"), (2.0, "2"), (-0.0, "0"), (np.float64(3.0), "3"), (np.float32(4.0), "4"),
    (1.5, "1.5"), (np.float64(0.25), "0.25"), (math.inf, "inf"),
    ("basic", "basic"), ("1", "1"), ("0", "0"), ("1.0", "1.0"), ("", ""), (" true", " true"),
    ("yes", "yes"),
])
def test_category_of_one_cell(value, expected):
    assert category(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (True, "true"), (False, "false"), ("True", "true"), ("false", "false"),
    (1, "true"), (0, "false"), (np.int64(1), "true"), (1.0, "true"), (0.0, "false"),
    ("1", "true"), ("0", "false"), (None, None), (math.nan, None),
    ("maybe", "maybe"), (2, "2"), (0.5, "0.5"), ("yes", "yes"),
])
def test_category_of_a_boolean_cell(value, expected):
    assert category(value, boolean=True) == expected


def test_category_series_keeps_booleans_and_numbers_apart():
    # In an object column True == 1 and False == 0 hash alike: a factorisation alone would
    # take them for one value.
    mixed = pd.Series([True, 1, 1.0, False, 0, None, "True", "x", np.nan, np.True_],
                      index=list("abcdefghij"), name="flag", dtype=object)

    plain = category_series(mixed)
    assert plain.dtype == object and plain.name == "flag"
    assert list(plain.index) == list("abcdefghij")
    assert plain.where(plain.notna(), None).tolist() == [
        "true", "1", "1", "false", "0", None, "true", "x", None, "true"]
    assert category_series(mixed, boolean=True).where(plain.notna(), None).tolist() == [
        "true", "true", "true", "false", "false", None, "true", "x", None, "true"]


@pytest.mark.parametrize(("series", "expected"), [
    (pd.Series([True, False, True]), ["true", "false", "true"]),
    (pd.Series([True, None, False], dtype="boolean"), ["true", None, "false"]),
    (pd.Series([1.0, 2.0, np.nan, 3.0]), ["1", "2", None, "3"]),
    (pd.Series([1, None, 3], dtype="Int64"), ["1", None, "3"]),
    (pd.Series(["a", None, "b"], dtype="category"), ["a", None, "b"]),
    (pd.Series(["True", "false", None], dtype="string"), ["true", "false", None]),
    (pd.Series([], dtype=object), []),
])
def test_category_series_of_every_dtype(series, expected):
    result = category_series(series)
    assert result.dtype == object
    assert [None if isinstance(v, float) and math.isnan(v) else v for v in result] == expected


def test_category_series_handles_a_million_rows_by_distinct_values():
    rng = np.random.default_rng(0)
    column = pd.Series(rng.choice(np.array([True, False, None], dtype=object), 1_000_000))

    started = time.perf_counter()
    result = category_series(column)
    elapsed = time.perf_counter() - started

    assert result.value_counts().to_dict().keys() == {"true", "false"}
    assert result.isna().sum() == (column.isna()).sum()
    assert elapsed < 5.0  # ~0.05 s: one factorisation, three conversions


def test_boolean_values_are_the_canonical_texts():
    assert BOOLEAN_VALUES == ("false", "true")
    assert {category(True), category(False)} == set(BOOLEAN_VALUES)


# --- the spec ----------------------------------------------------------------------------------


def _spec_data(*features: dict) -> dict:
    return {
        "name": "toy",
        "task": "binary_classification",
        "source": {"kind": "simulator"},
        "entity_key": "id",
        "timestamp": "ts",
        "label": "y",
        "features": list(features),
        "estimator": {"class_path": "sklearn.linear_model.LogisticRegression", "seed": 3},
        "gates": {"primary_metric": "roc_auc"},
    }


def _spec(*features: dict):
    return parse_spec(_spec_data(*features))


AMOUNT = {"name": "amount", "type": "numeric"}
FLAG = {"name": "flag", "type": "boolean", "max_null_fraction": 0.5}
PLAN = {"name": "plan", "type": "categorical", "values": [1, 2, 3], "max_null_fraction": 0.5}


def test_yes_and_no_in_a_spec_file_stay_the_text_a_csv_holds(tmp_path):
    """The spec file is read with YAML 1.2's booleans: unquoted yes/no/on/off are categories,
    not true/false (only true/false are booleans)."""
    path = tmp_path / "toy.yaml"
    text = yaml.safe_dump(_spec_data(AMOUNT, {"name": "answer", "type": "categorical",
                                              "values": ["yes", "no", "on", "off"]}))
    path.write_text(text.replace("'yes'", "yes").replace("'no'", "no").replace("'on'", "on")
                    .replace("'off'", "off"))
    assert "- yes" in path.read_text()
    assert load_spec(path).features[1].values == ["yes", "no", "on", "off"]


def test_a_boolean_feature_loads_as_a_categorical_input(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(_spec_data(AMOUNT, FLAG, PLAN)))

    spec = load_spec(path)

    assert spec.features[1].type == "boolean"
    assert spec.input_types == {"amount": "numeric", "flag": "categorical",
                                "plan": "categorical"}
    assert spec.categorical_features == ["flag", "plan"]
    assert spec.boolean_features == ["flag"]
    assert spec.features[2].values == ["1", "2", "3"]


@pytest.mark.parametrize(("values", "expected"), [
    (["True", "False"], ["true", "false"]),
    (["true", "false"], ["true", "false"]),
    ([True, False], ["true", "false"]),
    (["True", "true", "FALSE"], ["true", "false"]),
    ([1, 2, "3"], ["1", "2", "3"]),
    (["basic", "premium"], ["basic", "premium"]),
])
def test_declared_categories_are_kept_in_canonical_text(values, expected):
    spec = _spec({"name": "plan", "type": "categorical", "values": values})
    assert spec.features[0].values == expected


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"min": 0}, "features[0].min", "boolean feature takes no min/max"),
    ({"max": 1}, "features[0].max", "boolean feature takes no min/max"),
    ({"values": ["True", "False"]}, "features[0].values", "boolean feature takes no values"),
])
def test_a_boolean_feature_refuses_bounds_and_values(tmp_path, extra, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_spec_data({"name": "flag", "type": "boolean", **extra})))

    with pytest.raises(SpecError) as caught:
        load_spec(path)

    assert str(path) in str(caught.value)
    assert [(f, m) for f, m in caught.value.problems if f == field and words in m], \
        caught.value.problems


def test_a_category_that_is_neither_text_nor_integer_is_named():
    with pytest.raises(SpecError) as caught:
        _spec({"name": "plan", "type": "categorical", "values": ["a", {"b": 1}]})
    assert any(field == "features[0].values[1]" for field, _ in caught.value.problems)


# --- validation --------------------------------------------------------------------------------

CSV_HEADER = "id,ts,y,amount,flag\n"


def _csv(tmp_path: Path, flags: list[str]) -> pd.DataFrame:
    """A real CSV file read the way the file source reads it."""
    lines = [f"c{i},2026-03-01T{i % 24:02d}:00:00Z,{i % 2},{10.0 + i},{flag}"
             for i, flag in enumerate(flags)]
    path = tmp_path / "batch.csv"
    path.write_text(CSV_HEADER + "\n".join(lines) + "\n")
    return pd.read_csv(path, dtype={"id": str})


def _flags(rows: int = 40) -> list[str]:
    return ["True" if i % 3 else "False" for i in range(rows)]


BOOLEAN_FLAG = {"name": "flag", "type": "boolean"}
CATEGORICAL_FLAG = {"name": "flag", "type": "categorical", "values": ["True", "False"]}


@pytest.mark.parametrize("flag", [BOOLEAN_FLAG, CATEGORICAL_FLAG], ids=["boolean", "categorical"])
def test_a_csv_of_true_and_false_passes_validation(tmp_path, flag):
    frame = _csv(tmp_path, _flags())
    assert frame["flag"].dtype == bool  # what the user's CSV becomes

    outcome = validate_frame(_spec(AMOUNT, flag), frame)

    assert outcome.success, summarize_failures(outcome)
    assert frame["flag"].dtype == bool  # the batch itself is not rewritten


@pytest.mark.parametrize("flag", [BOOLEAN_FLAG, CATEGORICAL_FLAG], ids=["boolean", "categorical"])
def test_a_csv_with_empty_cells_passes_within_the_null_budget(tmp_path, flag):
    flags = _flags()
    flags[3] = flags[7] = ""
    frame = _csv(tmp_path, flags)
    assert frame["flag"].dtype == object and frame["flag"].isna().sum() == 2

    outcome = validate_frame(_spec(AMOUNT, {**flag, "max_null_fraction": 0.1}), frame)

    assert outcome.success, summarize_failures(outcome)


@pytest.mark.parametrize("flag", [BOOLEAN_FLAG, CATEGORICAL_FLAG], ids=["boolean", "categorical"])
def test_maybe_in_a_boolean_column_fails_naming_column_and_value(tmp_path, flag):
    flags = _flags()
    flags[5] = "maybe"
    frame = _csv(tmp_path, flags)

    outcome = validate_frame(_spec(AMOUNT, flag), frame)

    assert not outcome.success
    reason = summarize_failures(outcome)
    assert reason.startswith("flag: 1 value not in {"), reason
    assert "'true'" in reason and "'false'" in reason and "(e.g. 'maybe')" in reason
    assert [f["column"] for f in outcome.failures] == ["flag"]


def test_reference_categories_are_compared_in_canonical_text(tmp_path):
    # The reference (last validated snapshot) was a Parquet file of numpy booleans, the new
    # batch a CSV of "true"/"false" strings: one set of categories.
    spec = _spec(AMOUNT, {"name": "flag", "type": "categorical"})
    reference = _csv(tmp_path, _flags())
    batch = reference.assign(flag=reference["flag"].map({True: "TRUE", False: "false"}))

    outcome = validate_frame(spec, batch, reference)

    assert outcome.success, summarize_failures(outcome)


# --- training and scoring ----------------------------------------------------------------------


def _training_frame(rows: int = 400, seed: int = 0) -> pd.DataFrame:
    """Raw rows as a CSV gives them: booleans with gaps, integer codes read as floats."""
    rng = np.random.default_rng(seed)
    flag = rng.random(rows) < 0.4
    plan = rng.integers(1, 4, rows).astype(float)
    amount = rng.normal(50, 15, rows)
    signal = 1.5 * flag - 0.8 * (plan == 3) + (amount - 50) / 20
    frame = pd.DataFrame({
        "id": [f"c{i}" for i in range(rows)],
        "ts": pd.date_range("2026-03-01", periods=rows, freq="h", tz="UTC"),
        "y": (rng.random(rows) < 1 / (1 + np.exp(-signal))).astype(int),
        "amount": amount,
        "flag": pd.Series(flag, dtype=object),
        "plan": plan,
    })
    frame.loc[::17, "flag"] = None
    frame.loc[::23, "plan"] = np.nan
    return frame


def test_feature_frame_gives_true_and_false_and_integer_codes(tmp_path):
    spec = _spec(AMOUNT, FLAG, PLAN)
    raw = _training_frame(40)

    frame = feature_frame(spec, raw)

    assert frame.columns.tolist() == ["amount", "flag", "plan"]
    assert set(frame["flag"].dropna()) == {"true", "false"}
    assert frame["flag"].isna().sum() == raw["flag"].isna().sum()
    assert set(frame["plan"].dropna()) <= {"1", "2", "3"}
    assert frame["flag"].dtype == object and frame["plan"].dtype == object
    # A categorical column of true/false (not declared boolean) reads the same CSV alike.
    categorical = _spec(AMOUNT, CATEGORICAL_FLAG, PLAN)
    assert feature_frame(categorical, raw)["flag"].equals(frame["flag"])


@pytest.fixture(scope="module")
def fitted():
    spec = _spec(AMOUNT, FLAG, PLAN)
    raw = _training_frame()
    model = build_pipeline(spec, resolve_estimator(spec))
    model.fit(feature_frame(spec, raw), label_array(spec, raw))
    return spec, model


def _pipeline_scores(spec, model, rows: list[dict]) -> np.ndarray:
    return predict_scores(spec, model, pd.DataFrame.from_records(rows, columns=spec.input_names))


def test_the_model_learned_true_and_false(fitted):
    _, model = fitted
    encoder = model.named_steps["preprocess"].named_transformers_["categorical"]
    categories = encoder.named_steps["encode"].categories_
    assert [c.tolist() for c in categories] == [["false", "true"], ["1", "2", "3"]]


def test_fast_scorer_and_pipeline_agree_on_rows_with_booleans(fitted):
    spec, model = fitted
    scorer = compile_scorer(model, spec.numeric_features, spec.categorical_features,
                            positive=1, boolean=spec.boolean_features)
    rows = [
        {"amount": 40.0, "flag": True, "plan": 1},
        {"amount": 40.0, "flag": "True", "plan": "1"},
        {"amount": 40.0, "flag": "true", "plan": 1.0},
        {"amount": 40.0, "flag": 1, "plan": np.int64(1)},
        {"amount": 40.0, "flag": np.True_, "plan": np.float64(1.0)},
        {"amount": 55.0, "flag": False, "plan": 3},
        {"amount": 55.0, "flag": "FALSE", "plan": "3"},
        {"amount": 55.0, "flag": 0, "plan": 3.0},
        {"amount": 55.0, "flag": None, "plan": None},
        {"amount": 55.0, "flag": "maybe", "plan": 7},
    ]

    fast = scorer.scores(rows)
    pipeline = _pipeline_scores(spec, model, rows)

    np.testing.assert_allclose(fast, pipeline, rtol=0, atol=1e-12)
    assert len(set(np.round(fast[:5], 12))) == 1  # every spelling of (true, 1) scores alike
    assert len(set(np.round(fast[5:8], 12))) == 1
    assert fast[0] != fast[5]
    assert scorer.agrees_with(lambda r: _pipeline_scores(spec, model, r))[0]


def test_fast_scorer_without_boolean_columns_agrees_on_what_requests_carry(fitted):
    # The service's request models turn every boolean field into "true"/"false" first.
    spec, model = fitted
    scorer = compile_scorer(model, spec.numeric_features, spec.categorical_features, positive=1)
    rows = [{"amount": a, "flag": f, "plan": p}
            for a in (30.0, 70.0) for f in ("true", "false", True, False, None)
            for p in ("1", "2", 3)]
    np.testing.assert_allclose(scorer.scores(rows), _pipeline_scores(spec, model, rows),
                               rtol=0, atol=1e-12)


# --- the request models ------------------------------------------------------------------------


def _instance(predict, **fields):
    body = {"instances": [{"id": "c1", "amount": 10.0, "flag": True, "plan": "1", **fields}]}
    return predict.model_validate(body).instances[0].model_dump(by_alias=True)


@pytest.mark.parametrize(("sent", "received"), [
    (True, "true"), (False, "false"), ("True", "true"), ("false", "false"), ("TRUE", "true"),
    (1, "true"), (0, "false"), (None, None),
])
def test_a_boolean_request_field_becomes_true_or_false(sent, received):
    predict, _ = request_models(_spec(AMOUNT, FLAG, PLAN), 10)
    assert _instance(predict, flag=sent)["flag"] == received


@pytest.mark.parametrize("sent", ["maybe", 2, -1, 0.5, "1", "", [True], {"a": 1}])
def test_a_bad_boolean_request_field_is_refused_naming_it(sent):
    predict, _ = request_models(_spec(AMOUNT, FLAG, PLAN), 10)

    with pytest.raises(ValidationError) as caught:
        _instance(predict, flag=sent)

    message = describe_errors(caught.value)
    assert message.startswith("instances[0].flag: must be a boolean: true or false"), message
    assert caught.value.error_count() == 1


def test_a_boolean_request_field_without_a_null_budget_refuses_null():
    predict, _ = request_models(_spec(AMOUNT, BOOLEAN_FLAG), 10)
    with pytest.raises(ValidationError) as caught:
        predict.model_validate({"instances": [{"id": "c1", "amount": 1.0, "flag": None}]})
    assert describe_errors(caught.value).startswith("instances[0].flag: ")


@pytest.mark.parametrize(("sent", "received"), [
    ("1", "1"), (1, "1"), (3, "3"), (None, None),
])
def test_integer_codes_are_accepted_as_their_declared_text(sent, received):
    predict, _ = request_models(_spec(AMOUNT, FLAG, PLAN), 10)
    assert _instance(predict, plan=sent)["plan"] == received


def test_booleans_are_accepted_for_declared_true_false_categories():
    predict, _ = request_models(_spec(AMOUNT, CATEGORICAL_FLAG), 10)
    body = {"instances": [{"id": "c1", "amount": 1.0, "flag": flag}
                          for flag in (True, False, "True", "false")]}
    rows = predict.model_validate(body).model_dump(by_alias=True)["instances"]
    assert [row["flag"] for row in rows] == ["true", "false", "true", "false"]


@pytest.mark.parametrize("sent", [4, "4", True, 1.5])
def test_a_category_outside_the_declared_values_is_refused_naming_it(sent):
    predict, _ = request_models(_spec(AMOUNT, FLAG, PLAN), 10)
    with pytest.raises(ValidationError) as caught:
        _instance(predict, plan=sent)
    message = describe_errors(caught.value)
    assert message.startswith("instances[0].plan: Input should be '1', '2' or '3'"), message


# --- other sources: Parquet and SQL ------------------------------------------------------------


def test_parquet_with_a_bool_column_works_like_csv(tmp_path):
    spec = _spec(AMOUNT, {**BOOLEAN_FLAG, "max_null_fraction": 0.1})
    flags = _flags()
    flags[4] = ""
    from_csv = _csv(tmp_path, flags)
    path = tmp_path / "batch.parquet"
    from_csv.assign(flag=from_csv["flag"].astype("boolean")).to_parquet(path, index=False)
    from_parquet = pd.read_parquet(path)

    outcome = validate_frame(spec, from_parquet)

    assert outcome.success, summarize_failures(outcome)
    assert feature_frame(spec, from_parquet)["flag"].equals(feature_frame(spec, from_csv)["flag"])
    # and a plain (numpy) bool column without gaps
    _csv(tmp_path, _flags()).to_parquet(path, index=False)
    plain = pd.read_parquet(path)
    assert plain["flag"].dtype == bool
    assert validate_frame(spec, plain).success
    assert set(feature_frame(spec, plain)["flag"]) == {"true", "false"}


def test_a_sqlite_query_with_0_and_1_works_for_a_boolean_feature():
    spec = _spec(AMOUNT, {**BOOLEAN_FLAG, "max_null_fraction": 0.1},
                 {**PLAN, "max_null_fraction": 0.1})
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute("CREATE TABLE batch (id TEXT, ts TEXT, y INTEGER, amount REAL, "
                           "flag INTEGER, plan INTEGER)")
        connection.executemany(
            "INSERT INTO batch VALUES (?, ?, ?, ?, ?, ?)",
            [(f"c{i}", f"2026-03-01T{i % 24:02d}:00:00Z", i % 2, 10.0 + i,
              None if i == 6 else i % 3 % 2, None if i == 9 else 1 + i % 3) for i in range(40)])
        frame = pd.read_sql("SELECT * FROM batch", connection)
    finally:
        connection.close()
    assert frame["flag"].dtype == "float64"  # the NULL turns 0/1 into 0.0/1.0

    outcome = validate_frame(spec, frame)

    assert outcome.success, summarize_failures(outcome)
    inputs = feature_frame(spec, frame)
    assert set(inputs["flag"].dropna()) == {"true", "false"}
    assert set(inputs["plan"].dropna()) == {"1", "2", "3"}


def test_a_sqlite_2_in_a_boolean_column_fails_validation():
    spec = _spec(AMOUNT, BOOLEAN_FLAG)
    frame = pd.DataFrame({"id": ["a", "b", "c"], "ts": ["2026-03-01"] * 3, "y": [0, 1, 0],
                          "amount": [1.0, 2.0, 3.0], "flag": [0, 1, 2]})
    outcome = validate_frame(spec, frame)
    assert not outcome.success
    assert "flag: 1 value not in {'false', 'true'} (e.g. '2')" in summarize_failures(outcome)


# --- monitoring --------------------------------------------------------------------------------


def test_the_reference_profile_and_a_window_count_booleans_alike():
    spec = _spec(AMOUNT, FLAG, PLAN)
    raw = _training_frame()  # raw training rows: booleans and float codes

    profile = summarize_reference(raw, spec, MonitoringConfig())

    assert set(profile.columns["flag"].categories) == {"false", "true"}
    assert set(profile.columns["plan"].categories) == {"1", "2", "3"}
    assert set(profile.sample["flag"].dropna()) == {"false", "true"}
    # The window comes from the prediction log, in the service's text; an old log or another
    # writer may still hold booleans or 0/1.
    window = pd.DataFrame({"amount": [1.0, 2.0, 3.0, 4.0], "flag": ["true", True, 0, None],
                           "plan": ["1", 2, 3.0, None]})
    prepared = prepare_inputs(window, spec.input_types, boolean=spec.boolean_features)
    assert prepared["flag"].tolist() == ["true", "true", "false", None]
    assert prepared["plan"].tolist() == ["1", "2", "3", None]
