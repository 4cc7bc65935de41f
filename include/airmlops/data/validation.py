"""The validate_data stage: a Great Expectations suite derived from the spec and the reference.

The spec is the data contract (required columns, bounds, allowed categories, null budgets); the
reference (the last validated snapshot) fills in what the spec leaves open, loosely, so that a
batch that looks nothing like the previous ones is caught without a hand-written rule.

Great Expectations (1.x) is imported inside the functions: importing it costs seconds and logs
hundreds of INFO lines, so it happens only when a task validates data, with its logging quieted.

The HTML report is rendered here rather than by GE Data Docs: Data Docs 1.24 writes observed
values into the page unescaped (a category value ``<script>`` lands in the HTML as a tag) and
loads its styles and scripts from public CDNs. Data values are untrusted input, so the report is
a small self-contained page where every value is escaped and a Content-Security-Policy forbids
scripts altogether.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import html
import json
import logging
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.data.categories import BOOLEAN_VALUES, category_series
from airmlops.paths import atomic_write_json, atomic_write_text
from airmlops.spec import FeatureColumn, PipelineSpec

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

REFERENCE_MOSTLY = 0.99
"""Share of values that must fall inside a reference-derived rule (new data may drift a bit)."""
MAX_REFERENCE_CATEGORIES = 1000
"""A reference column with more distinct values than this is not treated as a closed set."""
MAX_EXAMPLES = 5
HTML_REPORT_NAME = "validation.html"
JSON_REPORT_NAME = "validation.json"

_COLUMN_EXISTS = "expect_column_to_exist"
_NOT_NULL = "expect_column_values_to_not_be_null"
_BETWEEN = "expect_column_values_to_be_between"
_IN_SET = "expect_column_values_to_be_in_set"
_ROW_COUNT = "expect_table_row_count_to_be_between"
_TYPE_RANK = {_ROW_COUNT: 0, _COLUMN_EXISTS: 1, _NOT_NULL: 2}


@dataclasses.dataclass(frozen=True)
class ValidationOutcome:
    """The result of validating one batch.

    ``statistics`` keeps GE's names: ``evaluated_expectations``, ``successful_expectations``,
    ``unsuccessful_expectations`` and ``success_percent``. ``failures`` holds one readable dict
    per failed expectation (``expectation``, ``column``, ``kwargs``, ``observed``); ``report`` is
    GE's full result as JSON-serialisable data; ``html`` a self-contained report page.
    """

    success: bool
    statistics: dict[str, Any]
    failures: list[dict[str, Any]]
    report: dict[str, Any]
    html: str | None


@contextlib.contextmanager
def _quiet_gx_logging() -> Iterator[None]:
    """Raise GE's loggers to WARNING for the duration, then restore them.

    Its import alone logs ~200 INFO lines, and some of its modules pin their own logger to INFO,
    so the parent logger is not enough: every existing ``great_expectations.*`` logger is raised.
    """
    names = ["great_expectations"] + [
        name for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger)
    ]
    previous: dict[str, int] = {}
    for name in names:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            previous[name] = logger.level
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def _import_gx() -> Any:
    with _quiet_gx_logging():
        import great_expectations as gx
    return gx


def build_expectations(spec: PipelineSpec, reference: pd.DataFrame | None) -> list[Expectation]:
    """The suite for ``spec``: the spec's contract, plus loose rules learned from ``reference``.

    Every required column gets its own existence check so a renamed or missing column is named
    in the report. The reference (the last validated snapshot) supplies allowed categories and a
    wide numeric band only where the spec gives none. A boolean feature must be "true"/"false";
    categories are compared in their canonical text (:func:`canonical_categories` of the batch,
    :mod:`airmlops.data.categories`), and the reference's categories are taken in that text too.
    """
    gx = _import_gx()
    gxe = gx.expectations
    expectations: list[Expectation] = [
        gxe.ExpectColumnToExist(column=column) for column in spec.required_columns
    ]
    expectations.append(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    for column in (spec.entity_key, spec.timestamp, spec.label):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column, mostly=1.0))
    if spec.task == "binary_classification":
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(column=spec.label, value_set=[0, 1], mostly=1.0)
        )
    for feature in spec.features:
        reference_values = None
        if reference is not None and feature.name in reference.columns:
            reference_values = reference[feature.name]
        if feature.max_null_fraction < 1.0:
            # 1 - 0.7 is 0.30000000000000004 in floating point: round, so exactly 70% nulls passes.
            mostly = round(1.0 - feature.max_null_fraction, 10)
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=feature.name,
                                                                   mostly=mostly))
        if feature.type == "numeric":
            expectations.extend(_numeric_expectations(gxe, feature, reference_values))
        elif feature.type == "boolean":
            expectations.append(gxe.ExpectColumnValuesToBeInSet(
                column=feature.name, value_set=list(BOOLEAN_VALUES), mostly=1.0))
        else:
            if reference_values is not None:
                reference_values = category_series(reference_values)
            expectations.extend(_categorical_expectations(gxe, feature, reference_values))
    return expectations


def canonical_categories(spec: PipelineSpec, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its categorical and boolean feature columns in canonical text, so the in-set
    checks compare like with like: a CSV's ``True`` is read as a boolean, the spec says
    "true". A new frame sharing the other columns; ``df`` itself is left as it is (the stored
    snapshot keeps the data as it came)."""
    frame = df.copy(deep=False)
    for feature in spec.features:
        if feature.type != "numeric" and feature.name in frame.columns:
            frame[feature.name] = category_series(df[feature.name],
                                                  boolean=feature.type == "boolean")
    return frame


def _numeric_expectations(gxe: Any, feature: FeatureColumn,
                          reference: pd.Series | None) -> list[Expectation]:
    expectations = []
    if feature.min is not None or feature.max is not None:
        expectations.append(gxe.ExpectColumnValuesToBeBetween(
            column=feature.name, min_value=feature.min, max_value=feature.max, mostly=1.0))
    band = _reference_band(reference) if reference is not None else None
    if band is not None:
        low = band[0] if feature.min is None else None
        high = band[1] if feature.max is None else None
        if low is not None or high is not None:
            expectations.append(gxe.ExpectColumnValuesToBeBetween(
                column=feature.name, min_value=low, max_value=high, mostly=REFERENCE_MOSTLY))
    return expectations


def _reference_band(values: pd.Series) -> tuple[float, float] | None:
    """[min - span, max + span] of the reference's finite values: catches unit changes and
    garbage, not ordinary drift (drift is the monitoring DAG's job)."""
    import numpy as np
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return None
    finite = pd.to_numeric(values, errors="coerce").astype("float64")
    finite = finite[np.isfinite(finite)]
    if finite.empty:
        return None
    low, high = float(finite.min()), float(finite.max())
    span = (high - low) or max(abs(high), 1.0)
    return low - span, high + span


def _categorical_expectations(gxe: Any, feature: FeatureColumn,
                              reference: pd.Series | None) -> list[Expectation]:
    if feature.values is not None:
        return [gxe.ExpectColumnValuesToBeInSet(
            column=feature.name, value_set=list(feature.values), mostly=1.0)]
    if reference is None:
        return []
    observed = reference.dropna().unique()
    if len(observed) == 0 or len(observed) > MAX_REFERENCE_CATEGORIES:
        return []
    value_set = sorted((_plain(value) for value in observed), key=lambda v: (type(v).__name__,
                                                                           str(v)))
    return [gxe.ExpectColumnValuesToBeInSet(
        column=feature.name, value_set=value_set, mostly=REFERENCE_MOSTLY)]


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (so the suite serialises as JSON)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def validate_frame(
    spec: PipelineSpec,
    df: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    *,
    docs_dir: Path | None = None,
    run_time: dt.datetime | None = None,
) -> ValidationOutcome:
    """Validate ``df`` against the suite built from ``spec`` and ``reference``.

    Runs in a fresh ephemeral GE context (nothing is written by GE). Missing columns do not
    raise: GE records them as failed expectations. With ``docs_dir``, the HTML report and the
    JSON result are written there atomically (``validation.html``, ``validation.json``).
    ``run_time`` (the run's logical date) stamps the result; without it GE uses the clock.
    Categorical and boolean columns are checked in their canonical text
    (:func:`canonical_categories`); ``df`` is not changed.
    """
    gx = _import_gx()
    expectations = build_expectations(spec, reference)
    with _quiet_gx_logging():
        result = _run_suite(gx, spec, canonical_categories(spec, df), expectations, run_time)
        report = result.to_json_dict()
    results = sorted(report["results"], key=_result_order(spec))
    failures = [_readable(item) for item in results if not item["success"]]
    statistics = dict(report["statistics"])
    outcome = ValidationOutcome(success=bool(report["success"]), statistics=statistics,
                                failures=failures, report=report, html=None)
    page = _render_html(spec, df, results, outcome, run_time)
    outcome = dataclasses.replace(outcome, html=page)
    if docs_dir is not None:
        atomic_write_text(Path(docs_dir) / HTML_REPORT_NAME, page)
        atomic_write_json(Path(docs_dir) / JSON_REPORT_NAME, report)
    return outcome


def _run_suite(gx: Any, spec: PipelineSpec, df: pd.DataFrame, expectations: list[Expectation],
               run_time: dt.datetime | None) -> Any:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False,
                                                         metric_calculations=False)
    # add_* raises on a name already present: fresh names keep repeated calls independent.
    suffix = uuid.uuid4().hex[:12]
    batch_definition = (
        context.data_sources.add_pandas(f"{spec.name}_{suffix}")
        .add_dataframe_asset(f"{spec.name}_batch")
        .add_batch_definition_whole_dataframe("whole_batch")
    )
    suite = context.suites.add(
        gx.ExpectationSuite(name=f"{spec.name}_data_contract_{suffix}", expectations=expectations)
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{spec.name}_validate_data_{suffix}",
                                data=batch_definition, suite=suite)
    )
    run_id = gx.RunIdentifier(run_name=f"{spec.name}_validate_data", run_time=run_time)
    return definition.run(batch_parameters={"dataframe": df}, result_format="SUMMARY",
                          run_id=run_id)


def _result_order(spec: PipelineSpec) -> Any:
    """Sort key: table checks first, then columns in spec order, existence and nulls first."""
    column_rank = {column: i for i, column in enumerate(spec.required_columns)}

    def key(item: dict[str, Any]) -> tuple[int, int, str]:
        config = item["expectation_config"]
        column = config["kwargs"].get("column")
        rank = -1 if column is None else column_rank.get(column, len(column_rank))
        return rank, _TYPE_RANK.get(config["type"], len(_TYPE_RANK)), config["type"]

    return key


def _readable(item: dict[str, Any]) -> dict[str, Any]:
    """One GE result as {expectation, column, kwargs, observed}."""
    config = item["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in ("batch_id", "column")}
    return {
        "expectation": config["type"],
        "column": config["kwargs"].get("column"),
        "kwargs": kwargs,
        "observed": _observed(item),
    }


def _observed(item: dict[str, Any]) -> dict[str, Any]:
    error = _exception_message(item.get("exception_info"))
    if error:
        return {"error": error}
    kind = item["expectation_config"]["type"]
    result = item.get("result") or {}
    if kind == _COLUMN_EXISTS:
        return {"exists": bool(item["success"])}
    keep = ("observed_value", "element_count", "missing_count", "unexpected_count",
            "unexpected_percent")
    observed = {key: result[key] for key in keep if key in result}
    if kind != _NOT_NULL:
        counts = result.get("partial_unexpected_counts") or []
        examples = [entry["value"] for entry in counts if "value" in entry]
        examples = examples or list(result.get("partial_unexpected_list") or [])
        if examples:
            observed["unexpected_examples"] = examples[:MAX_EXAMPLES]
    return observed


def _exception_message(info: Any) -> str | None:
    """GE's exception_info is either one {raised_exception, exception_message, ...} dict or a
    dict of them keyed by metric; return the distinct messages of those that raised."""
    if not isinstance(info, dict):
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    messages = []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            message = str(entry.get("exception_message") or "unknown error")
            if message not in messages:
                messages.append(message)
    return "; ".join(messages) or None


def summarize_failures(outcome: ValidationOutcome) -> str:
    """A short reason, one problem per line, naming each column (a missing column only once)."""
    if outcome.success:
        return f"all {outcome.statistics.get('evaluated_expectations', 0)} expectations passed"
    missing = [f["column"] for f in outcome.failures if f["expectation"] == _COLUMN_EXISTS]
    lines = [f"column '{column}' is missing" for column in missing]
    for failure in outcome.failures:
        if failure["expectation"] == _COLUMN_EXISTS or failure["column"] in missing:
            continue
        lines.append(_describe(failure))
    return "\n".join(lines) or "validation failed (no failed expectation was reported)"


def _describe(failure: dict[str, Any]) -> str:
    kind, column = failure["expectation"], failure["column"]
    kwargs, observed = failure["kwargs"], failure["observed"]
    prefix = f"{column}: " if column else ""
    if "error" in observed:
        return f"{prefix}{kind} could not be evaluated ({observed['error']})"
    mostly = kwargs.get("mostly")
    mostly = 1.0 if mostly is None else float(mostly)
    count = int(observed.get("unexpected_count") or 0)
    percent = float(observed.get("unexpected_percent") or 0.0)
    if kind == _ROW_COUNT:
        return (f"the batch has {observed.get('observed_value')} rows "
                f"(at least {kwargs.get('min_value')} required)")
    if kind == _NOT_NULL:
        if mostly < 1.0:
            return f"{column}: {percent:.3g}% nulls (max {(1.0 - mostly) * 100:.3g}%)"
        return f"{column}: {_plural(count, 'null')} (none allowed)"
    amount = (f"{percent:.3g}% of values (max {(1.0 - mostly) * 100:.3g}%)" if mostly < 1.0
              else _plural(count, "value"))
    examples = observed.get("unexpected_examples") or []
    example_text = f" (e.g. {', '.join(_short(v) for v in examples)})" if examples else ""
    if kind == _BETWEEN:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low is not None and high is not None:
            where = f"outside [{_number(low)}, {_number(high)}]"
        elif low is not None:
            where = f"below {_number(low)}"
        else:
            where = f"above {_number(high)}"
        return f"{column}: {amount} {where}{example_text}"
    if kind == _IN_SET:
        allowed = kwargs.get("value_set") or []
        shown = ", ".join(_short(v) for v in allowed[:10]) + (", ..." if len(allowed) > 10 else "")
        return f"{column}: {amount} not in {{{shown}}}{example_text}"
    return f"{prefix}{kind} failed (observed {_short(observed, 200)})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _number(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1f24}
h1{font-size:1.4rem} .pass{color:#1a7f37} .fail{color:#cf222e}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa} tr.fail td:first-child{font-weight:bold}
code{white-space:pre-wrap;word-break:break-word}
"""


def _render_html(spec: PipelineSpec, df: pd.DataFrame, results: list[dict[str, Any]],
                 outcome: ValidationOutcome, run_time: dt.datetime | None) -> str:
    """A self-contained page; every value from the data or the spec goes through html.escape."""
    e = html.escape
    stats = outcome.statistics
    status = "PASSED" if outcome.success else "FAILED"
    css_class = "pass" if outcome.success else "fail"
    rows = []
    for item in results:
        readable = _readable(item)
        ok = bool(item["success"])
        rows.append(
            f'<tr class="{"pass" if ok else "fail"}"><td>{"pass" if ok else "FAIL"}</td>'
            f"<td>{e(readable['expectation'])}</td><td>{e(str(readable['column'] or '(table)'))}"
            f"</td><td><code>{e(_short(readable['kwargs'], 400))}</code></td>"
            f"<td><code>{e(_short(readable['observed'], 400))}</code></td></tr>"
        )
    problems = ""
    if not outcome.success:
        items = "".join(f"<li>{e(line)}</li>" for line in summarize_failures(outcome).splitlines())
        problems = f"<h2>Problems</h2><ul>{items}</ul>"
    when = f" at {e(run_time.isoformat())}" if run_time is not None else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" "
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Data validation: {e(spec.name)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Data validation: {e(spec.name)}</h1>"
        f'<p class="{css_class}"><strong>{status}</strong>: '
        f"{e(str(stats.get('successful_expectations')))} of "
        f"{e(str(stats.get('evaluated_expectations')))} expectations passed on "
        f"{len(df)} rows x {len(df.columns)} columns{when}.</p>"
        f"{problems}<h2>Expectations</h2><table><thead><tr><th>Status</th><th>Expectation</th>"
        "<th>Column</th><th>Arguments</th><th>Observed</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></body></html>\n"
    )
