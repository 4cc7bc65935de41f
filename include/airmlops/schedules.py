"""Schedules in a spec: an Airflow preset or a five-field cron expression, checked at load.

A schedule Airflow cannot read would make the whole DAG file fail to import; checking it when
the spec is loaded turns it into that spec's own error (``schedule: ...``). ``croniter`` is the
parser Airflow's cron timetables use, and Airflow imports it anyway when it builds a DAG with a
cron schedule, so the check adds no import cost at parse time.
"""

from __future__ import annotations

import datetime as dt

PRESETS: tuple[str, ...] = ("@once", "@continuous", "@hourly", "@daily", "@weekly",
                            "@monthly", "@quarterly", "@yearly")
"""Airflow 3's schedule presets (``airflow.sdk.definitions.timetables._cron.CRON_PRESETS`` plus
``@once`` and ``@continuous``)."""
MAX_CRON_CHARS = 200


def check_schedule(value: str, *, presets: tuple[str, ...] = PRESETS) -> str:
    """Return ``value`` when it is one of ``presets`` or a valid five-field cron expression.

    Raises ValueError saying what was expected (the caller's field name is added by pydantic).
    """
    text = value.strip()
    if text.startswith("@"):
        if text in presets:
            return text
        raise ValueError(f"{value!r} is not a schedule preset; expected one of {list(presets)} "
                         "or a five-field cron expression such as '0 3 * * *'")
    if len(text) > MAX_CRON_CHARS:
        raise ValueError(f"a cron expression has at most {MAX_CRON_CHARS} characters")
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"{value!r} is not a cron expression; expected five fields (minute hour "
                         "day-of-month month day-of-week) such as '0 3 * * *', or a preset such "
                         "as '@daily'")
    from croniter import CroniterError, croniter

    if not croniter.is_valid(text):
        raise ValueError(f"{value!r} is not a valid cron expression (minute hour day-of-month "
                         "month day-of-week)")
    try:  # a date that never comes (30 February) fails only when Airflow computes the next run
        croniter(text, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).get_next(dt.datetime)
    except (CroniterError, ValueError, KeyError):
        raise ValueError(f"{value!r} never fires: no date matches it") from None
    return text
