"""Airflow notifiers for pipeline alerts: the failure callback of every pipeline task, and e-mail
through an Airflow SMTP connection.

:class:`PipelineFailureNotifier` is what the DAG factory sets as ``on_failure_callback`` of every
task of a pipeline whose spec has alerts. Airflow calls it once a task has failed for good (a try
that will be retried calls ``on_retry_callback`` instead), in the process that ran the task, or
in the DAG processor for a task that died without reporting. It sends ``task_failed`` through
:func:`airmlops.alerts.notify_config`, the one path of every alert, and never raises into
Airflow. It holds only the pipeline's name and its ``alerts`` section, so it stays small in
every DAG the factory builds.

:func:`send_email_through_connection` is the e-mail channel when the spec's ``smtp.conn_id``
names an Airflow connection: Airflow's own ``SmtpNotifier`` sends it with that connection's
relay, TLS settings and credentials.

Alert texts are data: Airflow renders a notifier's ``template_fields`` with Jinja when it is
called as a callback, so this notifier has none, and ``SmtpNotifier`` is given its finished
subject and body and asked to ``notify`` directly, which renders nothing the alert carries.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from airmlops.alerts import AlertsConfig, SmtpAlerts, notify_config, one_line

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
"""How much of a failed task's exception message an alert carries (one line)."""


class PipelineFailureNotifier(BaseNotifier):
    """Sends ``task_failed`` for the pipeline ``pipeline`` to the channels of ``config``.

    Use as a task's ``on_failure_callback``; ``notify`` never raises.
    """

    template_fields = ()  # nothing is rendered: exception messages are data, never templates

    def __init__(self, pipeline: str, config: AlertsConfig | None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.config = config

    def __repr__(self) -> str:
        channels = [name for name in ("smtp", "webhook")
                    if self.config is not None and getattr(self.config, name) is not None]
        return f"{type(self).__name__}(pipeline={self.pipeline!r}, channels={channels})"

    def __getstate__(self) -> dict[str, Any]:
        # Only the name and the config: the logger Airflow's mixin caches does not pickle.
        return {"pipeline": self.pipeline, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["pipeline"], state["config"])

    def __call__(self, *args: Any) -> None:
        try:
            super().__call__(*args)
        except Exception:  # Airflow logs a raising callback, but an alert must never fail
            log.exception("failure alert of %s could not be prepared", self.pipeline)

    def notify(self, context: Context) -> None:
        """Send ``task_failed`` with what ``context`` says about the failed task."""
        try:
            message, details = task_failure(context)
            result = notify_config(self.pipeline, self.config, "task_failed", message, details)
        except Exception:
            log.exception("failure alert of %s could not be sent", self.pipeline)
            return
        if result["skipped"]:
            log.info("failure alert of %s not sent: %s", self.pipeline, result["skipped"])


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


def send_email_through_connection(config: SmtpAlerts, subject: str, body: str) -> None:
    """Send one e-mail with Airflow's ``SmtpNotifier`` and the connection ``config.conn_id``.

    The connection (of type smtp; any other type is refused, so a spec cannot send another
    service's credentials to a mail relay) holds the relay and credentials, and the From address
    unless the spec gives one. The body goes as HTML-escaped preformatted text. Raises on
    failure; :func:`airmlops.alerts.notify_config` reports it.
    """
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier
    from airflow.sdk import BaseHook

    if config.conn_id is None:
        raise ValueError("smtp.conn_id is not set")
    connection = BaseHook.get_connection(config.conn_id)
    if connection.conn_type != "smtp":
        raise ValueError(f"Airflow connection {config.conn_id!r} is of type "
                         f"{connection.conn_type!r}, not smtp")
    notifier = SmtpNotifier(to=list(config.to), from_email=config.sender, subject=subject,
                            html_content=f"<pre>{html.escape(body)}</pre>",
                            smtp_conn_id=config.conn_id)
    notifier.notify({})  # not notifier(context): that would render the alert text with Jinja
