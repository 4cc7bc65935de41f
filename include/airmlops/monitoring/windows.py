"""Monitoring windows: their bounds, their ids and where their files live.

A window is the half-open interval ``[start, end)`` one monitoring run covers; its id
(``20260601T1000-20260601T1100``, UTC) names its Parquet folder, its HTML reports and its row
in the monitoring table, and gives back its bounds (:func:`parse_window_id`).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import TYPE_CHECKING

from airmlops.monitoring.policy import check_window_id
from airmlops.paths import safe_join
from airmlops.times import utc

if TYPE_CHECKING:
    from airmlops.settings import Settings

WINDOW_ID = re.compile(r"^(\d{8}T\d{4}(?:\d{2})?)-(\d{8}T\d{4}(?:\d{2})?)$")


def window_bounds(interval_start: dt.datetime | None, interval_end: dt.datetime,
                  window_minutes: int) -> tuple[dt.datetime, dt.datetime]:
    """The window a monitoring run covers: ``window_minutes`` ending at ``interval_end``.

    Scheduled runs (a cron trigger timetable) have an empty data interval at the tick, so their
    window is the ``window_minutes`` before it. A run given an explicit, non-empty data interval
    (the REST API accepts ``data_interval_start``/``data_interval_end``) covers exactly that
    interval, e.g. to report a past window again. Bounds are UTC, to the second.
    """
    end = utc(interval_end, "interval_end").replace(microsecond=0)
    if interval_start is not None:
        start = utc(interval_start, "interval_start").replace(microsecond=0)
        if start < end:
            return start, end
        if start > end:
            raise ValueError(f"data interval start {start} is after its end {end}")
    if window_minutes < 1:
        raise ValueError(f"window_minutes must be positive (got {window_minutes})")
    return end - dt.timedelta(minutes=window_minutes), end


def _stamp(moment: dt.datetime, seconds: bool) -> str:
    return moment.strftime("%Y%m%dT%H%M%S" if seconds else "%Y%m%dT%H%M")


def window_id_for(start: dt.datetime, end: dt.datetime) -> str:
    """``20260601T1000-20260601T1100`` (UTC; seconds only when a bound is not a whole minute)."""
    start, end = utc(start, "start"), utc(end, "end")
    if end <= start:
        raise ValueError(f"window end {end} must be after its start {start}")
    if start.microsecond or end.microsecond:
        raise ValueError("window bounds must be whole seconds")
    seconds = bool(start.second or end.second)
    return check_window_id(f"{_stamp(start, seconds)}-{_stamp(end, seconds)}")


def parse_window_id(window_id: str) -> tuple[dt.datetime, dt.datetime]:
    """The bounds a window id was made from (the inverse of :func:`window_id_for`)."""
    match = WINDOW_ID.match(check_window_id(window_id))
    if match is None:
        raise ValueError(f"window_id {window_id!r} is not <start>-<end> as YYYYMMDDTHHMM[SS]")
    bounds = []
    for text in match.groups():
        fmt = "%Y%m%dT%H%M%S" if len(text) == 15 else "%Y%m%dT%H%M"
        bounds.append(dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC))
    return bounds[0], bounds[1]


def window_dir(settings: Settings, pipeline: str, window_id: str) -> Path:
    """``<data_root>/monitoring/<pipeline>/windows/<window_id>`` (both parts validated)."""
    from airmlops.monitoring.store import MonitoringStore

    MonitoringStore(settings.data_root).path(pipeline)  # validates the pipeline name
    return safe_join(settings.data_root, "monitoring", pipeline, "windows",
                     check_window_id(window_id))


def report_html_path(settings: Settings, pipeline: str, window_id: str,
                     suffix: str = ".html") -> Path:
    """``<data_root>/reports/<pipeline>/monitoring/<window_id><suffix>``."""
    return safe_join(settings.reports_dir, pipeline, "monitoring",
                     f"{check_window_id(window_id)}{suffix}")
