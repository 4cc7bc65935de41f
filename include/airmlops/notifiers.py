"""What a ``task_failed`` alert says: the failed task, its error (one line, secrets masked).

:func:`task_failure` turns the context Airflow gives a failure callback into the message and
details of the alert; :class:`airmlops.dags.callbacks.PipelineFailureNotifier`, the callback the
DAG factory sets on every pipeline task, sends them. Nothing here imports Airflow at module
level: only :func:`mask_secrets` asks Airflow's secrets masker, when it is installed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from airmlops.alerts import one_line

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
"""How much of a failed task's exception message an alert carries (one line)."""


def task_failure(context: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The message and details of a ``task_failed`` alert, from a failure callback's context.

    Details: ``dag_id``, ``task_id``, ``run_id``, ``try_number``, ``max_tries``, ``map_index``
    (mapped tasks only), ``logical_date`` (ISO 8601 or None), ``error_type`` and ``error`` (one
    line of at most :data:`MAX_ERROR_CHARS`, secrets masked) and ``log_url`` when known. Keys
    Airflow did not give are None: a task that died without reporting has no exception object.
    """
    ti = context.get("task_instance") or context.get("ti")
    dag_id = _attribute(ti, "dag_id") or _attribute(context.get("dag"), "dag_id")
    task_id = _attribute(ti, "task_id") or _attribute(context.get("task"), "task_id")
    error = context.get("exception")
    error_type = type(error).__name__ if isinstance(error, BaseException) else None
    error_text = mask_secrets(one_line(error, MAX_ERROR_CHARS)) if error is not None else None
    logical_date = context.get("logical_date")
    details: dict[str, Any] = {
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": context.get("run_id") or _attribute(ti, "run_id"),
        "try_number": _attribute(ti, "try_number"),
        "max_tries": _attribute(ti, "max_tries"),
        "logical_date": (logical_date.isoformat() if isinstance(logical_date, dt.datetime)
                         else None),
        "error_type": error_type,
        "error": error_text,
    }
    map_index = _attribute(ti, "map_index")
    if isinstance(map_index, int) and map_index >= 0:
        details["map_index"] = map_index
    log_url = _attribute(ti, "log_url")
    if log_url:
        details["log_url"] = str(log_url)
    cause = ": ".join(part for part in (error_type, error_text) if part) or "no error reported"
    message = (f"task {task_id} of {dag_id} failed for good (try {details['try_number']}): "
               f"{cause}")
    return message, details


def mask_secrets(text: str) -> str:
    """``text`` with the secrets Airflow's masker knows (connection passwords and sensitive
    variables this process read) and the platform's own secret settings replaced by ``***``."""
    try:
        from airflow.sdk._shared.secrets_masker import redact  # where Airflow 3.3's task SDK has it

        text = str(redact(text))
    except Exception:
        log.debug("Airflow's secrets masker is not available", exc_info=True)
    for secret in _platform_secrets():
        text = text.replace(secret, "***")
    return text


def _platform_secrets() -> list[str]:
    from pydantic import SecretStr

    from airmlops.settings import get_settings

    try:
        settings = get_settings()
    except Exception:
        return []
    values = (getattr(settings, name) for name in type(settings).model_fields)
    return [value.get_secret_value() for value in values
            if isinstance(value, SecretStr) and value.get_secret_value()]


def _attribute(source: Any, name: str) -> Any:
    """``source.name``, or None when it has no such attribute (or computing it fails)."""
    if source is None:
        return None
    try:
        return getattr(source, name, None)
    except Exception:  # a property such as log_url reads Airflow's configuration
        return None
