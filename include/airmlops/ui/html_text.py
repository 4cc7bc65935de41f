"""Small HTML text helpers of the MLOps view: escaping, times and number formats."""

from __future__ import annotations

import datetime as dt
from html import escape

from airmlops.times import assume_utc


def e(value: object) -> str:
    """Escape anything for HTML text and attribute values."""
    return escape(str(value), quote=True)


def time_html(iso: str | None, now: dt.datetime) -> str:
    """``2026-04-01 10:00 UTC (3 h ago)`` with the exact value as tooltip; ``-`` if missing."""
    if not iso:
        return "-"
    try:
        when = assume_utc(iso)
    except ValueError:
        return e(iso)
    text = when.strftime("%Y-%m-%d %H:%M UTC")
    since = ago(now, when)
    return f'<span title="{e(iso)}">{e(text)}</span> <span class="muted">({e(since)})</span>'


def ago(now: dt.datetime, when: dt.datetime) -> str:
    """``3 h ago`` or ``in 5 min``: how far ``when`` is from ``now``."""
    seconds = (now - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        amount = f"{seconds:.0f} s"
    elif seconds < 90 * 60:
        amount = f"{seconds / 60:.0f} min"
    elif seconds < 36 * 3600:
        amount = f"{seconds / 3600:.0f} h"
    else:
        amount = f"{seconds / 86400:.0f} d"
    return f"in {amount}" if future else f"{amount} ago"


def count_text(value: int | None) -> str:
    """A count, or ``-``."""
    return "-" if value is None else e(value)


def rate_text(value: float | None) -> str:
    """A rate as a percent with two decimals, or ``-``."""
    return "-" if value is None else f"{100 * value:.2f} %"


def ms_text(value: float | None) -> str:
    """Milliseconds with one decimal, or ``-``."""
    return "-" if value is None else f"{value:.1f} ms"
