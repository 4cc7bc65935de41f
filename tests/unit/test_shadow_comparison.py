"""compare_shadow: the numbers of a shadow model beside the live one, checked against hand
computations (agreement), scipy (Kolmogorov-Smirnov) and scikit-learn (ROC AUC) on small
frames; empty, unlabelled and one-class inputs give None where nothing can be measured."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from airmlops.monitoring.shadow import (
    REGRESSION_AGREEMENT_TOLERANCE,
    ShadowComparison,
    compare_shadow,
)
from airmlops.serving.prediction_log import SHADOW_PAIR_COLUMNS

NAN = float("nan")


def pairs_frame(live: list[float], shadow: list[float], labels: list[float], *,
                classifier: bool) -> pd.DataFrame:
    """A read_shadow_pairs frame: scores become probabilities (and 0.5-thresholded classes)
    for a classifier, predictions for a regressor."""
    n = len(live)
    frame = pd.DataFrame({
        "request_id": [f"{i:032x}" for i in range(n)], "position": [0] * n,
        "entity_id": [f"C{i}" for i in range(n)],
        "ts": pd.date_range("2026-03-01", periods=n, freq="min", tz="UTC"),
        "live_version": ["1"] * n, "shadow_version": ["2"] * n,
        "label": np.asarray(labels, dtype="float64"),
    })
    for side, scores in (("live", live), ("shadow", shadow)):
        values = np.asarray(scores, dtype="float64")
        if classifier:
            frame[f"{side}_prediction"] = (values >= 0.5).astype("float64")
            frame[f"{side}_probability"] = values
        else:
            frame[f"{side}_prediction"] = values
            frame[f"{side}_probability"] = np.full(n, NAN)
    return frame[list(SHADOW_PAIR_COLUMNS)]


def test_classifier_numbers_match_hand_computations() -> None:
    live = [0.9, 0.2, 0.7, 0.4, 0.6, 0.1]
    shadow = [0.8, 0.3, 0.4, 0.45, 0.9, 0.6]
    labels = [1, 0, 1, NAN, 0, NAN]
    result = compare_shadow(pairs_frame(live, shadow, labels, classifier=True),
                            "binary_classification")
    # classes: live 1 0 1 0 1 0, shadow 1 0 0 0 1 1: rows 0, 1, 3 and 4 agree
    assert result.pairs == 6
    assert result.agreement_rate == pytest.approx(4 / 6)
    assert result.agreement_tolerance is None
    assert result.score_ks == pytest.approx(ks_2samp(live, shadow).statistic)
    assert result.mean_score_shift == pytest.approx(np.mean(shadow) - np.mean(live))
    assert result.labelled == 4 and result.metric == "roc_auc"
    known = [0, 1, 2, 4]
    truth = [labels[i] for i in known]
    assert result.live_metric == pytest.approx(roc_auc_score(truth, [live[i] for i in known]))
    assert result.shadow_metric == pytest.approx(
        roc_auc_score(truth, [shadow[i] for i in known]))
    assert result.live_metric == pytest.approx(1.0)  # every (positive, negative) pair ordered
    assert result.shadow_metric == pytest.approx(0.5)  # 2 of 4 pairs ordered


def test_regressor_agreement_uses_the_tolerance_relative_to_the_live_spread() -> None:
    live = [10.0, 20.0, 30.0, 40.0]
    std = float(np.std(live))  # 11.18...: the tolerance is 1.118
    shadow = [10.5, 21.5, 30.0, 38.0]
    labels = [11.0, NAN, 29.0, 40.0]
    result = compare_shadow(pairs_frame(live, shadow, labels, classifier=False), "regression")
    assert result.agreement_tolerance == pytest.approx(REGRESSION_AGREEMENT_TOLERANCE * std)
    assert result.agreement_rate == pytest.approx(2 / 4)  # |0.5| and |0| are within it
    assert result.score_ks == pytest.approx(ks_2samp(live, shadow).statistic)
    assert result.mean_score_shift == pytest.approx(np.mean(shadow) - np.mean(live))
    assert result.labelled == 3 and result.metric == "rmse"
    assert result.live_metric == pytest.approx(math.sqrt((1 + 1 + 0) / 3))
    assert result.shadow_metric == pytest.approx(math.sqrt((0.25 + 1 + 4) / 3))


def test_regressor_with_constant_live_predictions_agrees_only_on_equal_ones() -> None:
    result = compare_shadow(pairs_frame([5.0, 5.0], [5.0, 5.001], [NAN, NAN],
                                        classifier=False), "regression")
    assert result.agreement_tolerance == 0.0
    assert result.agreement_rate == 0.5


def test_empty_pairs_give_a_comparison_of_nothing() -> None:
    for task, metric in (("binary_classification", "roc_auc"), ("regression", "rmse")):
        result = compare_shadow(pairs_frame([], [], [], classifier=task != "regression"), task)
        assert result == ShadowComparison(
            task_type=task, pairs=0, agreement_rate=None, agreement_tolerance=None,
            score_ks=None, mean_score_shift=None, labelled=0, metric=metric,
            live_metric=None, shadow_metric=None)


def test_unlabelled_and_one_class_labels_give_no_metric() -> None:
    unlabelled = compare_shadow(pairs_frame([0.9, 0.1], [0.8, 0.2], [NAN, NAN],
                                            classifier=True), "binary_classification")
    assert unlabelled.pairs == 2 and unlabelled.labelled == 0
    assert unlabelled.live_metric is None and unlabelled.shadow_metric is None
    assert unlabelled.agreement_rate == 1.0 and unlabelled.score_ks is not None
    one_class = compare_shadow(pairs_frame([0.9, 0.1], [0.8, 0.2], [1, 1], classifier=True),
                               "binary_classification")
    assert one_class.labelled == 2
    assert one_class.live_metric is None and one_class.shadow_metric is None


def test_the_comparison_is_plain_json() -> None:
    result = compare_shadow(pairs_frame([0.9, 0.2, 0.6], [0.7, 0.1, 0.4], [1, 0, 1],
                                        classifier=True), "binary_classification")
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict, allow_nan=False)) == as_dict
    assert all(type(v) in (int, float, str, type(None)) for v in as_dict.values())


def test_an_unknown_task_or_a_frame_without_the_columns_is_refused() -> None:
    frame = pairs_frame([0.9], [0.8], [1], classifier=True)
    with pytest.raises(ValueError, match="task_type: 'classification' is not a task"):
        compare_shadow(frame, "classification")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        compare_shadow(frame.drop(columns="label"), "binary_classification")
