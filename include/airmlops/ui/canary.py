"""The last canary rollout of a deployment, read tolerantly for the MLOps view.

The deployment state keeps it under ``canary`` (see
:func:`airmlops.serving.deploy.rollout._canary_record`): its version, slot, start, outcome and
the numbers of every step (:func:`airmlops.serving.deploy.canary.run_canary`). A record that is
absent or not a mapping is no canary (None); a step or a value of the wrong shape is left out,
never an error: the page must render whatever an older or damaged state file holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from airmlops.ui.views import CanaryStepView, CanaryView

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
