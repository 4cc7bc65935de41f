"""The one base class of errors that retrying cannot fix.

A task that fails with a :class:`NonRetryable` error fails for good at once: a quarantined
batch, a version rolled back after its bake, a deploy that was refused, an invalid spec or a
malformed value between two tasks would fail the same way on every retry, and a retry would only
delay the alert. The DAG layer (:mod:`airmlops.dags`) turns these errors into Airflow's
``AirflowFailException`` in one place; everything else is retried as the DAG's default args say.
This module imports nothing, so any module can base its errors on it.
"""

from __future__ import annotations


class NonRetryable(Exception):
    """An error that would recur on a retry: the task fails without retrying."""


class BakeFailed(RuntimeError, NonRetryable):
    """The new version breached its bake limits, or failed a canary step, and was rolled back
    (the old version serves)."""
