"""Alerts of a pipeline: what happened, sent to the spec's e-mail and/or webhook channels.

The events, and the process that sends each:

- ``quarantine``: a data batch failed its contract and was quarantined (``validate_data`` task).
- ``not_blessed``: a challenger failed its gates (``validate_model`` task).
- ``rollback``: a deployment was rolled back, after its bake period (``monitor`` task) or by
  hand (``<name>_rollback`` DAG).
- ``retraining_decision``: monitoring decided to retrain (``decide`` task of
  ``<name>_monitoring``).
- ``task_failed``: any task of any pipeline DAG failed for good, after its retries (the task's
  ``on_failure_callback``, :class:`airmlops.dags.callbacks.PipelineFailureNotifier`, in the process
  that ran the task, or Airflow's DAG processor for a task that died without finishing).
- ``slot_died``: a model server (process or container) of a deployment died and was restarted;
  ``proxy_died``: the stable-address proxy died and was restarted; ``failover``: the stable
  address routed around a dead slot; ``serving_unavailable``: the stable address had no healthy
  upstream and answered 503; ``log_dropped``: prediction-log entries were dropped past the disk
  bound; ``log_quarantined``: prediction-log entries the backend refused were set aside in the
  spill folder's quarantine (all six by the serving supervisor, a long-lived process).
- ``shadow_awaiting_decision``: a shadow deploy with manual promotion finished its window and
  waits for a promote or reject decision from the MLOps view (``deploy`` task).

Every alert goes out through :func:`notify_config`; :func:`notify` is that for a spec. The
serving supervisor has no spec object: it calls :func:`notify_config` with the ``alerts`` section
a deploy saved as JSON (``AlertsConfig.model_dump(by_alias=True, mode="json")`` validates back to
the same config) and sends through an :class:`AlertThrottle`, so a crash loop gives one alert a
while with the count of those held back, not one a second.

A spec's ``alerts:`` section names where they go: an e-mail over SMTP (straight to a relay, or
through an Airflow SMTP connection and Airflow's ``SmtpNotifier`` when ``conn_id`` is given), a
JSON webhook, or both. The spec holds no secret: SMTP credentials and webhook headers (an
``Authorization`` header, a signing token) come from environment variables whose *names* the spec
gives, read when the alert is sent, or from the Airflow connection. Those names must start with
``MLOPS_ALERT_`` (read only through :func:`airmlops.settings.alert_secret`), so a spec can never
send the platform's own secrets (the Airflow JWT secret, the Fernet key, the database URL, the
serving token) anywhere. A webhook URL is either loopback (``http://127.0.0.1:...``, a local
relay) or https.

Sending never raises: an alert that cannot be delivered is logged and reported in its result,
and the step that raised it carries on (an outage of the mail relay must not fail a training run
or hide a decision).

Example::

    alerts:
      events: [quarantine, not_blessed, rollback, retraining_decision, task_failed]
      smtp: {host: smtp.example.com, port: 587, use_tls: true, from: mlops@example.com,
             to: [ml-team@example.com], username_env: MLOPS_ALERT_SMTP_USER,
             password_env: MLOPS_ALERT_SMTP_PASSWORD}
      # or through an Airflow connection, which holds host, port, TLS and credentials:
      # smtp: {conn_id: smtp_alerts, to: [ml-team@example.com]}
      webhook: {url: "https://hooks.example.com/mlops",
                headers_from_env: {Authorization: MLOPS_ALERT_WEBHOOK_AUTH}}

``events`` defaults to every event. Nothing heavy is imported here (the spec imports this module
at DAG parse time).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airmlops.settings import ALERT_ENV_PATTERN, ALERT_ENV_PREFIX, alert_secret

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

AlertEvent = Literal[
    "quarantine", "not_blessed", "rollback", "retraining_decision",
    "task_failed",
    "slot_died", "proxy_died", "failover", "serving_unavailable", "log_dropped",
    "log_quarantined", "shadow_awaiting_decision",
]
EVENTS: tuple[str, ...] = get_args(AlertEvent)
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
"""An HTTP header name (RFC 9110 token)."""
EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")
CONN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}$")
"""An Airflow connection id (letters, digits, ``_``, ``.``, ``-``)."""
MAX_MESSAGE_CHARS = 2000
SUBJECT_PREFIX = "[airmlops]"
HELD_BACK_KEY = "held_back_since_last"
"""The detail an :class:`AlertThrottle` adds: how many alerts of that kind it held back since the
last one that went out."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_env_name(value: str) -> str:
    if not ALERT_ENV_PATTERN.match(value):
        raise ValueError(f"{value!r} is not allowed: credentials come only from environment "
                         f"variables named {ALERT_ENV_PREFIX}<NAME> (upper case, digits, _); "
                         "the value itself never goes in the spec")
    return value


def _check_email(value: str) -> str:
    if not EMAIL.match(value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` is ``localhost`` or an address in 127.0.0.0/8 or ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SmtpAlerts(_Strict):
    """E-mail, straight to an SMTP relay (``host``; credentials from the named environment
    variables) or through an Airflow SMTP connection (``conn_id``; Airflow's ``SmtpNotifier``)."""

    conn_id: str | None = Field(
        default=None, description="Send through Airflow's SmtpNotifier and this Airflow "
        "connection (of type smtp) instead of host/port: the connection holds the relay's host, "
        "port, TLS, timeout and credentials, and may hold the From address (extra from_email).")
    host: str | None = Field(default=None, description="The relay's host name or address "
                             "(required unless conn_id is given).")
    port: int = Field(default=25, ge=1, le=65535)
    sender: str | None = Field(default=None, alias="from", description="The From address "
                               "(required unless conn_id's connection gives one).")
    to: list[str] = Field(min_length=1, max_length=100)
    use_tls: bool = Field(default=False, description="Upgrade the connection with STARTTLS.")
    username_env: str | None = Field(
        default=None, description=f"Environment variable ({ALERT_ENV_PREFIX}*) holding the "
        "user name.")
    password_env: str | None = Field(
        default=None, description=f"Environment variable ({ALERT_ENV_PREFIX}*) holding the "
        "password.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("conn_id")
    @classmethod
    def _conn_id(cls, value: str | None) -> str | None:
        if value is not None and not CONN_ID.match(value):
            raise ValueError(f"{value!r} is not an Airflow connection id (letters, digits, _ . -)")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and not HOSTNAME.match(value):
            raise ValueError(f"{value!r} is not a host name or address")
        return value

    @field_validator("username_env", "password_env")
    @classmethod
    def _credential_names(cls, value: str | None) -> str | None:
        return value if value is None else _check_env_name(value)

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        return value if value is None else _check_email(value)

    @field_validator("to")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        return [_check_email(address) for address in value]

    @model_validator(mode="after")
    def _relay_or_connection(self) -> SmtpAlerts:
        if self.conn_id is None:
            missing = [name for name, value in (("host", self.host), ("from", self.sender))
                       if value is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
                                 " required unless conn_id names an Airflow SMTP connection")
            return self
        # The connection holds these: a value here would be silently ignored, so refuse it.
        relay_only = {"host": None, "port": 25, "use_tls": False, "timeout_seconds": 10.0,
                      "username_env": None, "password_env": None}
        given = [name for name, default in relay_only.items() if getattr(self, name) != default]
        if given:
            raise ValueError(f"conn_id {self.conn_id!r} sends through that Airflow connection, "
                             f"which holds the relay's settings and credentials: remove "
                             f"{', '.join(given)}")
        return self


class WebhookAlerts(_Strict):
    """A JSON POST to a loopback or https URL; header values come from environment variables."""

    url: str = Field(min_length=8, max_length=2000)
    headers_from_env: dict[str, str] = Field(
        default_factory=dict,
        description=f"Header name -> name of the environment variable ({ALERT_ENV_PREFIX}*) "
        "holding its value.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _loopback_or_https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; use headers_from_env")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host")
        if parts.scheme == "https":
            return value
        if parts.scheme == "http" and is_loopback_host(parts.hostname):
            return value
        raise ValueError(f"{value!r} must be https, or http on a loopback address")

    @field_validator("headers_from_env")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header, env_name in value.items():
            if not HEADER_NAME.match(header):
                raise ValueError(f"{header!r} is not an HTTP header name")
            if header.lower() in ("host", "content-length", "content-type", "transfer-encoding"):
                raise ValueError(f"header {header!r} is set by the client itself")
            try:
                _check_env_name(env_name)
            except ValueError as error:
                raise ValueError(f"header {header!r}: {error}") from None
        return value


class AlertsConfig(_Strict):
    """Where a pipeline's alerts go (either channel or both) and which events are sent.

    ``AlertsConfig.model_validate(config.model_dump(by_alias=True, mode="json"))`` is ``config``
    again: a deploy saves it as JSON for the serving supervisor.
    """

    events: list[AlertEvent] = Field(default_factory=lambda: list(EVENTS), min_length=1)
    smtp: SmtpAlerts | None = None
    webhook: WebhookAlerts | None = None

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicated entries in {value}")
        return value

    def sends(self, event: str) -> bool:
        """Whether ``event`` goes anywhere: a channel is configured and the event subscribed."""
        return (self.smtp is not None or self.webhook is not None) and event in self.events


def _secret(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    value = alert_secret(name)
    if value is None:
        raise RuntimeError(f"{what}: environment variable {name} is not set")
    return value


def one_line(text: object, limit: int = 200) -> str:
    """``text`` with every run of whitespace (newlines too) made one space, cut to ``limit``."""
    return " ".join(str(text).split())[:limit]


def render_subject(pipeline: str, event: str, message: str) -> str:
    """``[airmlops] churn: retraining_decision: <first line of the message>`` (one line)."""
    return one_line(f"{SUBJECT_PREFIX} {pipeline}: {event}: {message}")


def render_body(pipeline: str, event: str, message: str, details: Mapping[str, Any]) -> str:
    return (f"Pipeline: {pipeline}\nEvent: {event}\n\n{message[:MAX_MESSAGE_CHARS]}\n\n"
            f"Details:\n{json.dumps(dict(details), indent=2, sort_keys=True, default=str)}\n")


def send_email(config: SmtpAlerts, subject: str, body: str) -> None:
    """Send one plain-text e-mail: straight to the relay (STARTTLS and login when configured),
    or through the Airflow connection ``conn_id`` names."""
    if config.conn_id is not None:
        send_email_through_connection(config, subject, body)
        return

    import smtplib
    import ssl
    from email.message import EmailMessage

    email = EmailMessage()
    email["Subject"] = subject
    email["From"] = config.sender
    email["To"] = ", ".join(config.to)
    email.set_content(body)
    username = _secret(config.username_env, "smtp.username_env")
    password = _secret(config.password_env, "smtp.password_env")
    with smtplib.SMTP(config.host, config.port, timeout=config.timeout_seconds) as client:
        if config.use_tls:
            client.starttls(context=ssl.create_default_context())
        if username is not None:
            client.login(username, password or "")
        client.send_message(email)


def send_email_through_connection(config: SmtpAlerts, subject: str, body: str) -> None:
    """Send one e-mail with Airflow's ``SmtpNotifier`` and the connection ``config.conn_id``.

    The connection (of type smtp; any other type is refused, so a spec cannot send another
    service's credentials to a mail relay) holds the relay and credentials, and the From address
    unless the spec gives one. The body goes as HTML-escaped preformatted text. Alert texts are
    data: the notifier is given its finished subject and body and asked to ``notify`` directly,
    which renders nothing with Jinja. Raises on failure; :func:`notify_config` reports it.
    """
    import html

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


def post_webhook(config: WebhookAlerts, payload: Mapping[str, Any]) -> int:
    """POST ``payload`` as JSON; return the status code (4xx/5xx raise). No redirects."""
    import httpx

    headers = {name: _secret(env, f"webhook header {name}")
               for name, env in config.headers_from_env.items()}
    headers["User-Agent"] = "airmlops-alerts"
    response = httpx.post(config.url, json=dict(payload), headers=headers,
                          timeout=config.timeout_seconds, follow_redirects=False)
    response.raise_for_status()
    return response.status_code


def _check_event(event: str) -> None:
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r}; expected one of {list(EVENTS)}")


def _result(event: str, skipped: str | None = None) -> dict[str, Any]:
    return {"event": event, "sent": [], "errors": {}, "skipped": skipped}


def notify_config(pipeline: str, config: AlertsConfig | None, event: AlertEvent, message: str,
                  details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Send ``event`` of ``pipeline`` to every channel of ``config``; never raises (but for an
    unknown event, a bug of the caller).

    Returns ``{"event", "sent": [channels], "errors": {channel: message}, "skipped": why}``:
    skipped when there is no config or channel, or the event is not subscribed.
    """
    _check_event(event)
    if config is None or (config.smtp is None and config.webhook is None):
        return _result(event, "no alerts configured")
    if event not in config.events:
        return _result(event, f"event {event} not subscribed")
    result = _result(event)
    details = dict(details or {})
    message = str(message)[:MAX_MESSAGE_CHARS]
    if config.smtp is not None:
        try:
            send_email(config.smtp, render_subject(pipeline, event, message),
                       render_body(pipeline, event, message, details))
            result["sent"].append("smtp")
        except Exception as error:  # an alert must never fail the step that raised it
            result["errors"]["smtp"] = f"{type(error).__name__}: {error}"
    if config.webhook is not None:
        payload = {"source": "airmlops", "pipeline": pipeline, "event": event,
                   "message": message, "details": json.loads(json.dumps(details, default=str))}
        try:
            post_webhook(config.webhook, payload)
            result["sent"].append("webhook")
        except Exception as error:
            result["errors"]["webhook"] = f"{type(error).__name__}: {error}"
    for channel, error in result["errors"].items():
        log.warning("alert %s of %s could not be sent by %s: %s", event, pipeline, channel,
                    error)
    if result["sent"]:
        log.info("alert %s of %s sent by %s", event, pipeline, ", ".join(result["sent"]))
    return result


def notify(spec: PipelineSpec, event: AlertEvent, message: str,
           details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Send ``event`` of ``spec``'s pipeline to every configured channel; never raises.

    :func:`notify_config` with the spec's name and ``alerts`` section.
    """
    return notify_config(spec.name, getattr(spec, "alerts", None), event, message, details)


class AlertThrottle:
    """At most one alert per ``(pipeline, event)`` every ``interval_seconds``, for a long-lived
    sender (the serving supervisor: a slot in a crash loop dies every few seconds).

    The alerts held back are counted, and the next one that goes out carries the count in its
    details (``held_back_since_last``). Thread-safe; ``clock`` is monotonic seconds.
    """

    def __init__(self, interval_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_seconds < 0:
            raise ValueError(f"interval_seconds must be >= 0, got {interval_seconds}")
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last_sent: dict[tuple[str, str], float] = {}
        self._held_back: dict[tuple[str, str], int] = {}

    def admit(self, pipeline: str, event: str) -> int | None:
        """None when this alert is to be held back (and counted); else how many were held back
        since the last one admitted (the count starts again from 0)."""
        key = (pipeline, event)
        with self._lock:
            now = self._clock()
            last = self._last_sent.get(key)
            if last is not None and now - last < self.interval_seconds:
                self._held_back[key] = self._held_back.get(key, 0) + 1
                return None
            self._last_sent[key] = now
            return self._held_back.pop(key, 0)

    def held_back(self, pipeline: str, event: str) -> int:
        """How many alerts of this kind are held back now, not yet reported."""
        with self._lock:
            return self._held_back.get((pipeline, event), 0)

    def notify_config(self, pipeline: str, config: AlertsConfig | None, event: AlertEvent,
                      message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:func:`notify_config` unless held back (then ``skipped`` says so and nothing is
        sent); never raises. Events nobody receives are not counted."""
        _check_event(event)
        if config is None or not config.sends(event):
            return notify_config(pipeline, config, event, message, details)
        held_back = self.admit(pipeline, event)
        if held_back is None:
            return _result(event, f"throttled: at most one {event} alert of {pipeline} every "
                                  f"{self.interval_seconds:g}s")
        details = dict(details or {})
        if held_back:
            details[HELD_BACK_KEY] = held_back
        return notify_config(pipeline, config, event, message, details)
