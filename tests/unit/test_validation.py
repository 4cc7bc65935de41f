"""The validate_data suite: what it lets through, what it stops, and how it explains itself."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from airmlops.data.validation import (
    HTML_REPORT_NAME,
    JSON_REPORT_NAME,
    build_expectations,
    summarize_failures,
    validate_frame,
)
from airmlops.spec import PipelineSpec, parse_spec

ROWS = 100


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return parse_spec({
        "name": "toy",
        "task": "binary_classification",
        "source": {"kind": "simulator"},
        "entity_key": "customer_id",
        "timestamp": "event_timestamp",
        "label": "churned",
        "features": [
            {"name": "plan", "type": "categorical", "values": ["basic", "premium"]},
            {"name": "region", "type": "categorical"},
            {"name": "age", "type": "numeric", "min": 18, "max": 100},
            {"name": "minutes", "type": "numeric", "min": 0, "max_null_fraction": 0.1},
            {"name": "score", "type": "numeric"},
        ],
        "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
        "gates": {"primary_metric": "roc_auc"},
    })


def clean_frame(rows: int = ROWS) -> pd.DataFrame:
    index = np.arange(rows)
    return pd.DataFrame({
        "customer_id": index % 37,
        "event_timestamp": pd.date_range("2026-03-01", periods=rows, freq="h", tz="UTC"),
        "churned": index % 2,
        "plan": np.where(index % 3 == 0, "premium", "basic"),
        "region": np.where(index % 2 == 0, "north", "south"),
        "age": 18.0 + (index % 80),
        "minutes": (index * 7 % 300).astype(float),
        "score": (index % 10) / 10.0,
    })


def failed(outcome, expectation: str, column: str | None) -> bool:
    return any(f["expectation"] == expectation and f["column"] == column
               for f in outcome.failures)


def test_clean_frame_passes(spec):
    outcome = validate_frame(spec, clean_frame(), clean_frame())

    assert outcome.success, outcome.failures
    assert outcome.failures == []
    stats = outcome.statistics
    assert stats["evaluated_expectations"] == stats["successful_expectations"] > 20
    assert stats["unsuccessful_expectations"] == 0
    evaluated = stats["evaluated_expectations"]
    assert summarize_failures(outcome) == f"all {evaluated} expectations passed"
    json.dumps(outcome.report)  # the full GE result is plain JSON


def test_renamed_column_fails_naming_it(spec):
    frame = clean_frame().rename(columns={"age": "age_years"})

    outcome = validate_frame(spec, frame)

    assert not outcome.success
    assert failed(outcome, "expect_column_to_exist", "age")
    # The checks on the absent column fail (GE reports the error) instead of raising.
    between = next(f for f in outcome.failures
                   if f["expectation"] == "expect_column_values_to_be_between"
                   and f["column"] == "age")
    assert "does not exist" in between["observed"]["error"]
    assert summarize_failures(outcome).splitlines() == ["column 'age' is missing"]


def test_nulls_above_the_budget_fail_and_at_the_budget_pass(spec):
    over = clean_frame()
    over.loc[: int(ROWS * 0.3) - 1, "minutes"] = np.nan
    at_budget = clean_frame()
    at_budget.loc[: int(ROWS * 0.1) - 1, "minutes"] = np.nan  # exactly max_null_fraction

    outcome = validate_frame(spec, over)

    assert failed(outcome, "expect_column_values_to_not_be_null", "minutes")
    assert "minutes: 30% nulls (max 10%)" in summarize_failures(outcome)
    assert validate_frame(spec, at_budget).success


def test_nulls_in_key_columns_fail(spec):
    frame = clean_frame()
    frame["event_timestamp"] = frame["event_timestamp"].astype(object)
    frame.loc[3, "event_timestamp"] = None

    outcome = validate_frame(spec, frame)

    assert failed(outcome, "expect_column_values_to_not_be_null", "event_timestamp")
    assert "event_timestamp: 1 null (none allowed)" in summarize_failures(outcome)


def test_out_of_range_values_fail(spec):
    frame = clean_frame()
    frame.loc[[1, 5, 9], "age"] = 150.0

    outcome = validate_frame(spec, frame)

    assert failed(outcome, "expect_column_values_to_be_between", "age")
    assert "age: 3 values outside [18, 100]" in summarize_failures(outcome)


def test_unknown_category_fails(spec):
    frame = clean_frame()
    frame.loc[7, "plan"] = "gold"

    outcome = validate_frame(spec, frame)

    failure = next(f for f in outcome.failures if f["column"] == "plan")
    assert failure["expectation"] == "expect_column_values_to_be_in_set"
    assert failure["observed"]["unexpected_examples"] == ["gold"]
    assert "plan: 1 value not in {'basic', 'premium'} (e.g. 'gold')" in summarize_failures(outcome)


@pytest.mark.parametrize(("bad_value", "expectation"), [
    (2, "expect_column_values_to_be_in_set"),
    (None, "expect_column_values_to_not_be_null"),
])
def test_bad_label_fails(spec, bad_value, expectation):
    frame = clean_frame()
    frame["churned"] = frame["churned"].astype(object)
    frame.loc[0, "churned"] = bad_value

    outcome = validate_frame(spec, frame)

    assert not outcome.success
    assert failed(outcome, expectation, "churned")
    assert "churned" in summarize_failures(outcome)


def test_categories_come_from_the_reference_when_the_spec_has_none(spec):
    reference = clean_frame()
    region_rule = next(
        e for e in build_expectations(spec, reference)
        if e.expectation_type == "expect_column_values_to_be_in_set" and e.column == "region"
    )
    assert sorted(region_rule.value_set) == ["north", "south"]
    assert region_rule.mostly == pytest.approx(0.99)
    assert not any(getattr(e, "column", None) == "region"
                   and e.expectation_type.endswith("in_set")
                   for e in build_expectations(spec, None))

    rare = clean_frame()
    rare.loc[0, "region"] = "east"  # 1% new: within the reference rule's tolerance
    common = clean_frame()
    common.loc[:4, "region"] = "mars"  # 5% unseen

    assert validate_frame(spec, rare, reference).success
    outcome = validate_frame(spec, common, reference)
    assert failed(outcome, "expect_column_values_to_be_in_set", "region")
    assert "region: 5% of values (max 1%) not in {'north', 'south'}" in summarize_failures(outcome)
    assert validate_frame(spec, common).success  # no reference, no rule on region


def test_unbounded_numeric_gets_a_wide_band_from_the_reference(spec):
    reference = clean_frame()  # score spans [0, 0.9]
    band = next(e for e in build_expectations(spec, reference)
                if e.expectation_type == "expect_column_values_to_be_between"
                and getattr(e, "column", None) == "score")
    assert (band.min_value, band.max_value) == pytest.approx((-0.9, 1.8))
    # minutes has a spec minimum: the reference only adds the missing upper side.
    minutes = [e for e in build_expectations(spec, reference)
               if e.expectation_type == "expect_column_values_to_be_between"
               and getattr(e, "column", None) == "minutes"]
    low, high = reference["minutes"].min(), reference["minutes"].max()
    assert [(e.min_value, e.max_value) for e in minutes] == [(0, None), (None, high + high - low)]

    drifted = clean_frame()
    drifted["score"] = drifted["score"] * 100  # a unit change: percent instead of fraction

    outcome = validate_frame(spec, drifted, reference)
    assert failed(outcome, "expect_column_values_to_be_between", "score")
    assert "score:" in summarize_failures(outcome)


def test_empty_batch_fails_without_crashing(spec):
    outcome = validate_frame(spec, clean_frame().iloc[0:0])

    assert not outcome.success
    assert "the batch has 0 rows (at least 1 required)" in summarize_failures(outcome)


def test_html_report_escapes_values_and_is_written_to_docs_dir(spec, tmp_path):
    frame = clean_frame()
    frame.loc[2, "plan"] = "<script>alert(1)</script>"

    outcome = validate_frame(spec, frame, docs_dir=tmp_path / "docs")

    assert outcome.html is not None
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in outcome.html
    assert "<script" not in outcome.html.lower()
    assert "default-src 'none'" in outcome.html  # no script could run even if one slipped in
    assert "plan" in outcome.html and "FAILED" in outcome.html
    assert (tmp_path / "docs" / HTML_REPORT_NAME).read_text(encoding="utf-8") == outcome.html
    saved = json.loads((tmp_path / "docs" / JSON_REPORT_NAME).read_text(encoding="utf-8"))
    assert saved["success"] is False
    assert saved["statistics"] == outcome.statistics


def test_summary_names_every_failing_column(spec):
    frame = clean_frame().drop(columns=["score"])
    frame.loc[: int(ROWS * 0.5), "minutes"] = np.nan
    frame.loc[4, "age"] = 5.0
    frame.loc[6, "plan"] = "platinum"

    lines = summarize_failures(validate_frame(spec, frame)).splitlines()

    assert lines[0] == "column 'score' is missing"
    assert sum("score" in line for line in lines) == 1  # the missing column is reported once
    for column in ("minutes", "age", "plan"):
        assert any(line.startswith(f"{column}: ") for line in lines), lines


def test_ge_info_logging_is_silenced_and_levels_restored(spec, caplog):
    before = logging.getLogger("great_expectations").level
    caplog.set_level(logging.INFO)

    validate_frame(spec, clean_frame())

    noisy = [r for r in caplog.records
             if r.name.startswith("great_expectations") and r.levelno < logging.WARNING]
    assert noisy == []
    assert logging.getLogger("great_expectations").level == before
