"""The last canary and shadow rollouts of a deployment, read tolerantly for the MLOps view.

The deployment state keeps them under ``canary`` and ``shadow`` (see
:mod:`airmlops.serving.deploy.rollout`): each one's version, slot, start and outcome, with the
numbers of every canary step (:func:`airmlops.serving.deploy.canary.run_canary`) or the shadow's
judgement (:func:`airmlops.serving.deploy.shadow.run_shadow`). A record that is absent or not a
mapping is none (None); a step or a value of the wrong shape is left out, never an error: the
page must render whatever an older or damaged state file holds.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airmlops.ui.views import CanaryStepView, CanaryView, ShadowView

log = logging.getLogger("airmlops.ui")

MAX_STEPS = 100
"""More steps than a plan can have (percents are strictly increasing in 1..100)."""


def canary_view(record: Any) -> CanaryView | None:
    """The view of a state's ``canary`` record; None when absent or not a record."""
    if not isinstance(record, Mapping):
        return None
    raw_steps = record.get("steps")
    steps = []
    if isinstance(raw_steps, list | tuple):
        for raw in raw_steps[:MAX_STEPS]:
            step = _step_view(raw)
            if step is not None:
                steps.append(step)
    return CanaryView(
        version=_text(record.get("version")),
        slot=_text(record.get("slot")),
        started_at=_text(record.get("started_at")),
        outcome=_text(record.get("outcome")),
        steps=tuple(steps),
    )


def _step_view(raw: Any) -> CanaryStepView | None:
    """One step's view; None when it is not a mapping with a percent."""
    if not isinstance(raw, Mapping):
        return None
    percent = _count(raw.get("percent"))
    if percent is None:
        return None
    live = raw.get("live")
    live = live if isinstance(live, Mapping) else {}
    return CanaryStepView(
        percent=percent,
        requests=_count(raw.get("requests")),
        errors=_count(raw.get("errors")),
        error_rate=_number(raw.get("error_rate")),
        p50_ms=_number(raw.get("p50_ms")),
        live_requests=_count(live.get("requests")),
        live_error_rate=_number(live.get("error_rate")),
        live_p50_ms=_number(live.get("p50_ms")),
        live_window=_text(live.get("window")),
        z=_number(raw.get("z")),
        verdict=_text(raw.get("verdict")),
        reason=_text(raw.get("reason")),
        extended=raw.get("extended") is True,
        seconds=_number(raw.get("seconds")),
    )


def shadow_view(record: Any, comparison: Mapping[str, Any] | None = None) -> ShadowView | None:
    """The view of a state's ``shadow`` record; None when absent or not a record. A fresher
    ``comparison`` of the same window (read again once labels arrived) replaces the recorded
    one."""
    if not isinstance(record, Mapping):
        return None
    judgement = _mapping(record.get("judgement"))
    shadow, live = _mapping(judgement.get("shadow")), _mapping(judgement.get("live"))
    compared = comparison if comparison is not None else _mapping(judgement.get("comparison"))
    reasons = judgement.get("reasons")
    return ShadowView(
        version=_text(record.get("version")), slot=_text(record.get("slot")),
        outcome=_text(record.get("outcome")),
        percent=_count(judgement.get("percent")),
        shadow_requests=_count(shadow.get("requests")),
        shadow_error_rate=_number(shadow.get("error_rate")),
        shadow_p50_ms=_number(shadow.get("p50_ms")),
        live_requests=_count(live.get("requests")),
        live_error_rate=_number(live.get("error_rate")),
        live_p50_ms=_number(live.get("p50_ms")),
        pairs=_count(compared.get("pairs")),
        agreement_rate=_number(compared.get("agreement_rate")),
        score_ks=_number(compared.get("score_ks")),
        mean_score_shift=_number(compared.get("mean_score_shift")),
        labelled=_count(compared.get("labelled")),
        metric=_text(compared.get("metric")),
        live_metric=_number(compared.get("live_metric")),
        shadow_metric=_number(compared.get("shadow_metric")),
        reasons=tuple(str(r)[:500] for r in reasons[:MAX_STEPS] if isinstance(r, str))
        if isinstance(reasons, list | tuple) else (),
        **_decision_fields(record, judgement),
    )


RUNNING = ("running", "awaiting")
RULE_KEYS = ("min_requests", "min_agreement", "max_score_ks", "max_error_rate_increase",
             "max_latency_ratio")


def _decision_fields(record: Mapping[str, Any], judgement: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """Whether the shadow is still running, its promotion mode and rule, and who decided."""
    status = record.get("status")
    rule = _mapping(record.get("rule"))
    decision = _mapping(record.get("decision") or judgement.get("decision"))
    running = status in RUNNING
    return {
        "status": status if running else None,
        "started_at": _text(record.get("started") if running else None)
        or _text(record.get("started_at")),
        "promotion": _text(record.get("promotion") or judgement.get("promotion")),
        "rule": tuple((key, value) for key in RULE_KEYS
                      if (value := _number(rule.get(key))) is not None),
        "rule_verdict": _text(judgement.get("rule_verdict")),
        "decided_by": _text(record.get("decided_by") or judgement.get("decided_by")),
        "decided_at": _text(decision.get("at")),
    }


def shadow_window(record: Any) -> tuple[str, str] | None:
    """The ISO start and end of a ``shadow`` record's mirrored window; None when it has none."""
    window = _mapping(_mapping(record).get("judgement")).get("window")
    start, end = _mapping(window).get("start"), _mapping(window).get("end")
    if isinstance(start, str) and isinstance(end, str) and start and end:
        return start, end
    return None


def relabelled_comparison(pipeline: str, task_type: str, record: Any, data_root: Path,
                          now: dt.datetime) -> dict[str, Any] | None:
    """The comparison of a ``shadow`` record's window read again from the prediction log with
    the labels received until ``now`` (both models' metric once labels arrived); None when the
    record has no window, or the log cannot be read or no longer holds its pairs (the recorded
    comparison is shown then)."""
    window = shadow_window(record)
    if window is None:
        return None
    from airmlops.monitoring.shadow import window_comparison
    from airmlops.settings import get_settings
    from airmlops.times import assume_utc

    try:
        settings = get_settings().model_copy(update={"data_root": data_root})
        start, end = assume_utc(window[0]), assume_utc(window[1])
        comparison = window_comparison(pipeline, task_type, start, end, settings,
                                       labels_end=now)
    except Exception as exc:  # the view shows what was recorded
        log.warning("MLOps view: the shadow comparison of %s could not be read again: %s",
                    pipeline, exc)
        return None
    return comparison if comparison.get("pairs") else None  # gone from the log: as recorded


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """A finite real number (not a bool) as a float; else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    """A non-negative int (not a bool); else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _text(value: Any) -> str | None:
    """A non-empty string or number as text; else None."""
    if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
        return None
    return str(value)
