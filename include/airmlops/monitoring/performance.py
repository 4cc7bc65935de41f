"""A window's performance on its labelled rows, with Evidently (scikit-learn as a fallback).

Labels are joined with the window's predictions on the label keys (the last label per key
wins). With at least ``performance.min_labels`` labelled rows, a time-stratified sample of
them goes through Evidently's classification metrics (ROC AUC, precision, recall) or
regression metrics (MAE, RMSE); with fewer, performance is None and a note says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airmlops.monitoring.sampling import stratified_sample
from airmlops.monitoring.snapshots import data_definition, finite

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.spec import PipelineSpec


def labelled_rows(window: pd.DataFrame, labels: pd.DataFrame, label_column: str,
                  prediction_column: str, keys: list[str], ts_column: str) -> pd.DataFrame:
    """The window's rows that have a label (the last label per key wins)."""
    for frame, what, needed in ((window, "window", (*keys, prediction_column)),
                                (labels, "labels", (*keys, label_column))):
        absent = [c for c in needed if c not in frame.columns]
        if absent:
            raise ValueError(f"the {what} frame lacks column(s) {absent}")
    known = labels[[*keys, label_column]].dropna()
    known = known.drop_duplicates(keys, keep="last")
    keep = [*keys, prediction_column]
    if ts_column in window.columns and ts_column not in keys:
        keep.append(ts_column)
    # Keys are unique on the right after drop_duplicates (pandas' validate= would re-check
    # that at 4x the cost of the merge itself on a million rows).
    merged = window[keep].merge(known, on=keys, how="inner")
    return merged.dropna(subset=[prediction_column])


def _metrics_for(frame: pd.DataFrame, spec: PipelineSpec, config: MonitoringConfig,
                 notes: list[str]) -> tuple[Any, dict[str, Any]]:
    """The data definition and the Evidently metrics (by name) of the spec's task; converts
    ``frame``'s target to the task's type in place."""
    from evidently import BinaryClassification, Regression
    from evidently.metrics import MAE, RMSE, Precision, Recall, RocAuc

    if spec.task != "binary_classification":
        frame["target"] = frame["target"].astype("float64")
        definition = data_definition(["target", "prediction"], [], regression=[
            Regression(target="target", prediction="prediction")])
        return definition, {"mae": MAE(), "rmse": RMSE()}
    frame["target"] = frame["target"].astype("int64")
    definition = data_definition(["prediction"], ["target"], classification=[
        BinaryClassification(target="target", prediction_probas="prediction", pos_label=1)])
    threshold = config.performance.probability_threshold
    metrics: dict[str, Any] = {"precision": Precision(probas_threshold=threshold),
                               "recall": Recall(probas_threshold=threshold)}
    if frame["target"].nunique() > 1:
        metrics = {"roc_auc": RocAuc(), **metrics}
    else:
        notes.append("roc_auc not computed: the labelled rows have a single class")
    return definition, metrics


def evidently_performance(labelled: pd.DataFrame, spec: PipelineSpec, config: MonitoringConfig,
                          label_column: str, prediction_column: str, notes: list[str]
                          ) -> tuple[dict[str, float], Any | None]:
    """Evidently classification (ROC AUC, precision, recall) or regression (MAE, RMSE) metrics,
    and the snapshot (None when Evidently failed and scikit-learn computed them)."""
    from evidently import Dataset, Report

    frame = labelled[[label_column, prediction_column]].rename(
        columns={label_column: "target", prediction_column: "prediction"})
    frame["prediction"] = frame["prediction"].astype("float64")
    definition, metrics = _metrics_for(frame, spec, config, notes)
    try:
        snapshot = Report(list(metrics.values())).run(
            Dataset.from_pandas(frame, data_definition=definition), None)
    except ValueError as error:  # its plots fail on degenerate data, e.g. a constant error
        notes.append(f"Evidently could not compute performance ({error}); computed with "
                     "scikit-learn, no HTML section")
        return sklearn_performance(frame, list(metrics), config), None
    names = {f"evidently:metric_v2:{type(metric).__name__}": name
             for name, metric in metrics.items()}
    values: dict[str, float] = {}
    for result in snapshot.dict()["metrics"]:
        name = names.get(result.get("config", {}).get("type"))
        if name is None:
            continue
        value = result["value"]
        if isinstance(value, dict):  # MAE reports {"mean": ..., "std": ...}
            value = value.get("mean")
        values[name] = finite(value)
    values["rows"] = len(frame)
    return values, snapshot


def sklearn_performance(frame: pd.DataFrame, names: list[str],
                        config: MonitoringConfig) -> dict[str, float]:
    """The same metrics as :func:`evidently_performance`, straight from scikit-learn."""
    from sklearn import metrics as sk

    target, prediction = frame["target"], frame["prediction"]
    predicted = (prediction >= config.performance.probability_threshold).astype("int64")
    compute = {
        "roc_auc": lambda: sk.roc_auc_score(target, prediction),
        "precision": lambda: sk.precision_score(target, predicted, zero_division=0),
        "recall": lambda: sk.recall_score(target, predicted, zero_division=0),
        "mae": lambda: sk.mean_absolute_error(target, prediction),
        "rmse": lambda: sk.root_mean_squared_error(target, prediction),
    }
    values: dict[str, float] = {name: finite(compute[name]()) for name in names}
    values["rows"] = len(frame)
    return values


def measure_labels(window: pd.DataFrame, labels: pd.DataFrame | None, spec: PipelineSpec,
                   config: MonitoringConfig, seed: int, notes: list[str], *, ts_column: str,
                   prediction_column: str, label_keys: tuple[str, ...], label_column: str
                   ) -> tuple[dict[str, float] | None, int, Any | None]:
    """Performance on the window's labelled rows, their count and the Evidently snapshot;
    performance is None (with a note) without labels or with fewer than ``min_labels``."""
    if labels is None:
        notes.append("performance not computed: no labels yet")
        return None, 0, None
    labelled = labelled_rows(window, labels, label_column, prediction_column, list(label_keys),
                             ts_column)
    label_count = len(labelled)
    if label_count < config.performance.min_labels:
        notes.append(f"performance not computed: {label_count} labelled rows, fewer than "
                     f"min_labels ({config.performance.min_labels})")
        return None, label_count, None
    if label_count > config.sample_size and ts_column in labelled.columns:
        labelled = stratified_sample(labelled, ts_column, config.sample_size, seed,
                                     strata=config.strata)
    performance, snapshot = evidently_performance(labelled, spec, config, label_column,
                                                  prediction_column, notes)
    return performance, label_count, snapshot
