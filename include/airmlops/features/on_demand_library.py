"""The allow-listed on-demand feature functions.

A spec names an on-demand feature's function by its registered name (``function:
minutes_per_session``); only functions registered here can run, so a spec can never import
arbitrary code. Each function has two implementations that must agree value for value:

- ``scalar``: plain Python on one request row (serving). Inputs are Python values or ``None``;
  it returns a Python value or ``None``.
- ``vectorized``: the same computation on pandas Series (training). It returns an array-like of
  the same length; a missing value is ``NaN`` (numeric) or ``None``.

Null rules, shared by all functions here: a missing input gives a missing output, and a division
by zero gives a missing output (never ``inf``). Timestamps without a time zone are taken as UTC.
``tests/unit/test_on_demand.py`` checks every registered function for equality of both paths,
nulls and zero divisions included.

To add a function: write the scalar and vectorised forms and register them with
:func:`register`; the equality test picks the new function up automatically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable
from typing import Any, Literal

from airmlops.times import assume_utc

FeatureType = Literal["numeric", "categorical"]


@dataclasses.dataclass(frozen=True)
class OnDemandFunction:
    """One registered on-demand function: its two implementations and its signature."""

    name: str
    scalar: Callable[..., Any]
    vectorized: Callable[..., Any]
    arity: int
    output_type: FeatureType
    input_kinds: tuple[Literal["numeric", "timestamp", "any"], ...]


REGISTRY: dict[str, OnDemandFunction] = {}
"""Registered functions by name: the allow-list."""


def register(
    *,
    vectorized: Callable[..., Any],
    output_type: FeatureType = "numeric",
    input_kinds: tuple[Literal["numeric", "timestamp", "any"], ...],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated scalar function (by its ``__name__``) with its vectorised twin."""

    def decorate(scalar: Callable[..., Any]) -> Callable[..., Any]:
        name = scalar.__name__
        if name in REGISTRY:
            raise ValueError(f"on-demand function {name!r} is registered twice")
        REGISTRY[name] = OnDemandFunction(
            name=name,
            scalar=scalar,
            vectorized=vectorized,
            arity=len(input_kinds),
            output_type=output_type,
            input_kinds=input_kinds,
        )
        return scalar

    return decorate


def get_function(name: str) -> OnDemandFunction:
    """The registered function ``name``; a KeyError lists what is registered."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown on-demand function {name!r}; registered: {sorted(REGISTRY)}"
        ) from None


# --- shared helpers ------------------------------------------------------------------------


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float | None:
    """A Python float, or None for a missing or non-numeric value."""
    if _is_null(value) or isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _safe_divide(numerator: Any, denominator: Any) -> float | None:
    a, b = _number(numerator), _number(denominator)
    if a is None or b is None or b == 0.0:
        return None
    return a / b


def _numeric_array(values: Any) -> Any:
    import numpy as np
    import pandas as pd

    series = pd.Series(values, copy=False)
    if series.dtype == np.float64:  # already numbers with NaN missing: no copy
        return series.to_numpy()
    if series.dtype == object:  # mixed values: exactly the scalar rule, row by row
        series = series.map(_number)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _safe_divide_vec(numerator: Any, denominator: Any) -> Any:
    import numpy as np

    a, b = _numeric_array(numerator), _numeric_array(denominator)
    out = np.full(len(a), np.nan)
    ok = ~np.isnan(a) & ~np.isnan(b) & (b != 0.0)
    np.divide(a, b, out=out, where=ok)
    return out


def _utc_datetime(value: Any) -> dt.datetime | None:
    """A timezone-aware UTC datetime from a datetime, a date or an ISO 8601 string."""
    if _is_null(value):
        return None
    if isinstance(value, str):
        try:
            return assume_utc(value)
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        return assume_utc(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return None


def _utc_series(values: Any) -> Any:
    import pandas as pd

    series = pd.Series(values)
    if series.dtype == object:
        series = series.map(_utc_datetime)
    return pd.to_datetime(series, utc=True, errors="coerce")


# --- the functions -------------------------------------------------------------------------


@register(
    vectorized=lambda minutes, sessions: _safe_divide_vec(minutes, sessions),
    input_kinds=("numeric", "numeric"),
)
def minutes_per_session(minutes: Any, sessions: Any) -> float | None:
    """Minutes watched per session (missing when there was no session)."""
    return _safe_divide(minutes, sessions)


@register(
    vectorized=lambda fee, minutes: _safe_divide_vec(fee, minutes),
    input_kinds=("numeric", "numeric"),
)
def fee_per_minute(fee: Any, minutes: Any) -> float | None:
    """What a minute of watching costs the subscriber (missing when nothing was watched)."""
    return _safe_divide(fee, minutes)


def _is_weekend_vec(timestamps: Any) -> Any:
    import numpy as np

    stamps = _utc_series(timestamps)
    out = (stamps.dt.dayofweek >= 5).astype("float64").to_numpy()
    out[stamps.isna().to_numpy()] = np.nan
    return out


@register(vectorized=_is_weekend_vec, input_kinds=("timestamp",))
def is_weekend_request(timestamp: Any) -> float | None:
    """1.0 when the request time falls on a Saturday or Sunday (UTC), else 0.0."""
    stamp = _utc_datetime(timestamp)
    if stamp is None:
        return None
    return 1.0 if stamp.weekday() >= 5 else 0.0


def _ratio_vec(part: Any, whole: Any) -> Any:
    import numpy as np

    out = _safe_divide_vec(part, whole)
    return np.clip(out, 0.0, 1.0)  # NaN stays NaN


@register(vectorized=_ratio_vec, input_kinds=("numeric", "numeric"))
def share(part: Any, whole: Any) -> float | None:
    """``part / whole`` clipped to [0, 1] (for example failed payments among all payments)."""
    value = _safe_divide(part, whole)
    return None if value is None else min(max(value, 0.0), 1.0)
