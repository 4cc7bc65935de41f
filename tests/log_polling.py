"""Waiting for the prediction log: the service writes it in the background, a few ms behind its
answers, so a test that reads the log right after its traffic polls for the rows it sent."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any


def wait_logged(pipeline: str, start: dt.datetime, rows: int, settings: Any,
                timeout: float = 30.0) -> int:
    """Poll until the log of ``pipeline`` holds at least ``rows`` rows from ``start`` on;
    return how many it holds. Fails, saying how many arrived, after ``timeout`` seconds."""
    from airmlops.serving.prediction_log import read_predictions

    deadline = time.monotonic() + timeout
    while True:
        end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        logged = len(read_predictions(pipeline, start, end, settings=settings))
        if logged >= rows:
            return logged
        assert time.monotonic() < deadline, \
            f"only {logged} of {rows} predictions reached the log in {timeout:.0f} s"
        time.sleep(0.05)
