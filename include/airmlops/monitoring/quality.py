"""A window's data quality: exact counts of missing, out-of-range and new-category values.

Each model input is counted over every row of the window (an incident touching 0.5 % of rows
must not hide in a sample): its present values, and among them the flagged ones (outside the
valid range for a numeric input, not a known category for a categorical one). Counts add up,
so a window streamed from its Parquet file batch by batch (:func:`count_arrow`, over Arrow
arrays) gives the very numbers of the whole frame (:func:`quality_shares`, over pandas), and
:func:`shares_from_counts` turns either into the shares the judgement reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airmlops.data.categories import BOOLEAN_VALUES, category
from airmlops.monitoring.judgement import quality_limit
from airmlops.monitoring.reference import prepare_column

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.monitoring.reference import ReferenceProfile
    from airmlops.spec import PipelineSpec


@dataclass(frozen=True)
class ColumnRule:
    """What a model input is checked against: its kind, the valid range of a numeric input
    (None = open on that side), the known categories of a categorical one."""

    name: str
    kind: str
    boolean: bool
    low: float | None
    high: float | None
    known: frozenset[str]


def valid_range(feature: Any, profile: Any) -> tuple[float | None, float | None]:
    """The range a numeric input's values should fall in (None = open on that side): the spec's
    bounds when it declares any, else the whole reference data's min and max."""
    if feature is not None and (feature.min is not None or feature.max is not None):
        return feature.min, feature.max
    if profile is not None:
        return profile.min, profile.max
    return None, None


def column_rules(reference: ReferenceProfile, spec: PipelineSpec) -> list[ColumnRule]:
    """The rule of every model input, in the spec's order."""
    declared = {f.name: f for f in spec.features}
    booleans = set(spec.boolean_features)
    rules = []
    for name, kind in spec.input_types.items():
        feature, profile = declared.get(name), reference.columns.get(name)
        low = high = None
        known: set[str] = set()
        if kind == "numeric":
            low, high = valid_range(feature, profile)
        else:
            known = set(profile.categories) if profile is not None else set()
            if feature is not None and feature.values:
                known |= set(feature.values)
            if name in booleans:  # "false" is no new category of a reference of all "true"
                known |= set(BOOLEAN_VALUES)
        rules.append(ColumnRule(name, kind, name in booleans, low, high, frozenset(known)))
    return rules


def count_prepared(values: Any, rule: ColumnRule) -> tuple[int, int]:
    """``(present, flagged)`` of one prepared column (:func:`prepare_column`'s array)."""
    import numpy as np
    import pandas as pd

    present = ~pd.isna(values)
    array = values[present]
    if rule.kind == "numeric":
        outside = np.zeros(len(array), dtype=bool)
        if rule.low is not None:
            outside |= array < rule.low
        if rule.high is not None:
            outside |= array > rule.high
        return len(array), int(outside.sum())
    if not rule.known:
        return len(array), 0
    return len(array), int((~pd.Series(array).isin(rule.known)).sum())


def count_arrow(array: Any, rule: ColumnRule) -> tuple[int, int]:
    """``(present, flagged)`` of one Arrow array of raw window values, as
    :func:`count_prepared` counts the same values once prepared."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), kind.value_type
    if rule.kind == "numeric":
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)):
            values = prepare_column(_frame_of(array, rule.name), rule.name, "numeric")
            return count_prepared(values, rule)
        numbers = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
        return count_prepared(numbers, rule)
    present = flagged = 0
    counts = pc.value_counts(array)
    for value, count in zip(counts.field(0).to_pylist(), counts.field(1).to_pylist(),
                            strict=True):
        text = category(value, boolean=rule.boolean)
        if text is None:
            continue
        present += count
        if rule.known and text not in rule.known:
            flagged += count
    return present, flagged


def _frame_of(array: Any, name: str) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({name: array.to_pandas()})


def shares_from_counts(rows: int, counts: dict[str, tuple[int, int]],
                       rules: list[ColumnRule], spec: PipelineSpec,
                       config: MonitoringConfig) -> dict[str, dict[str, float]]:
    """The quality shares per model input from its ``(present, flagged)`` counts over ``rows``
    rows, each with the limit it is judged against and, for numeric inputs, the valid range."""
    quality: dict[str, dict[str, float]] = {}
    for rule in rules:
        present, flagged = counts[rule.name]
        entry: dict[str, Any] = {
            "missing_share": 1.0 - present / rows if rows else 0.0,
            "max_missing_share": quality_limit(config, spec, rule.name, "missing")}
        share = float(flagged / present) if present else 0.0
        if rule.kind == "numeric":
            entry.update({"out_of_range_share": share,
                          "max_out_of_range_share": quality_limit(config, spec, rule.name,
                                                                  "out_of_range"),
                          "range_min": rule.low, "range_max": rule.high})
        else:
            entry.update({"new_category_share": share,
                          "max_new_category_share": quality_limit(config, spec, rule.name,
                                                                  "new_category")})
        quality[rule.name] = entry
    return quality


def quality_shares(window: pd.DataFrame, reference: ReferenceProfile, spec: PipelineSpec,
                   config: MonitoringConfig) -> dict[str, dict[str, float]]:
    """Exact data quality shares per model input over the whole ``window`` frame (one column
    at a time, so memory stays at one column's copy)."""
    rules = column_rules(reference, spec)
    counts = {rule.name: count_prepared(prepare_column(window, rule.name, rule.kind,
                                                       boolean=rule.boolean), rule)
              for rule in rules}
    return shares_from_counts(len(window), counts, rules, spec, config)
