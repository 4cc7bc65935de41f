"""Times: every datetime the platform stores or compares is timezone-aware UTC.

:func:`utc` is the one check for a time that must carry its zone (window bounds, intervals,
record times); :func:`assume_utc` is for input where a naive time means UTC (an ISO string in
a request or a report file). :func:`epoch_us` is the integer form the prediction log keys on.
"""

from __future__ import annotations

import datetime as dt

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
EPOCH_DATE = EPOCH.date()


def utc(value: dt.datetime, name: str) -> dt.datetime:
    """``value`` in UTC as a plain :class:`datetime.datetime`; a naive time or a non-datetime
    is refused with a ValueError naming ``name``.

    Airflow hands out pendulum datetimes, whose ``replace`` and arithmetic do not always keep
    the time zone; the result is always the standard library's type.
    """
    if not isinstance(value, dt.datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime (got {value!r})")
    moment = value.astimezone(dt.UTC)
    return dt.datetime(moment.year, moment.month, moment.day, moment.hour, moment.minute,
                       moment.second, moment.microsecond, tzinfo=dt.UTC)


def assume_utc(value: dt.datetime | str) -> dt.datetime:
    """``value`` (a datetime or an ISO 8601 string) in UTC, a naive time taken as UTC."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def epoch_us(value: dt.datetime) -> int:
    """Microseconds since the epoch of an aware ``value`` (exact: no float rounding)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required (got {value!r})")
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
