"""Alerts: quarantined data, a model not blessed, a rollback, every retraining decision.

A spec's ``alerts:`` section names where they go: an e-mail over SMTP, a JSON webhook, or both.
The spec holds no secret: SMTP credentials and webhook headers (an ``Authorization`` header, a
signing token) are read from environment variables whose *names* the spec gives, when the alert
is sent. Those names must start with ``MLOPS_ALERT_`` (read only through
:func:`airmlops.settings.alert_secret`), so a spec can never send the platform's own secrets (the
Airflow JWT secret, the Fernet key, the database URL, the serving token) anywhere. A webhook URL
is either loopback (``http://127.0.0.1:...``, a local relay) or https.

:func:`notify` sends one event to every configured channel and never raises: an alert that
cannot be delivered is logged and reported in its result, and the pipeline step that raised it
carries on (an outage of the mail relay must not fail a training run or hide a decision).

Example::

    alerts:
      events: [quarantine, not_blessed, rollback, retraining_decision]
      smtp: {host: smtp.example.com, port: 587, use_tls: true, from: mlops@example.com,
             to: [ml-team@example.com], username_env: MLOPS_ALERT_SMTP_USER,
             password_env: MLOPS_ALERT_SMTP_PASSWORD}
      webhook: {url: "https://hooks.example.com/mlops",
                headers_from_env: {Authorization: MLOPS_ALERT_WEBHOOK_AUTH}}

Nothing heavy is imported here (the spec imports this module at DAG parse time).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from airmlops.settings import ALERT_ENV_PATTERN, ALERT_ENV_PREFIX, alert_secret

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

AlertEvent = Literal["quarantine", "not_blessed", "rollback", "retraining_decision"]
EVENTS: tuple[str, ...] = ("quarantine", "not_blessed", "rollback", "retraining_decision")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
"""An HTTP header name (RFC 9110 token)."""
EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")
MAX_MESSAGE_CHARS = 2000
SUBJECT_PREFIX = "[airmlops]"


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
    """E-mail through an SMTP relay. Credentials come from the named environment variables."""

    host: str = Field(description="The relay's host name or address.")
    port: int = Field(default=25, ge=1, le=65535)
    sender: str = Field(alias="from", description="The From address.")
    to: list[str] = Field(min_length=1, max_length=100)
    use_tls: bool = Field(default=False, description="Upgrade the connection with STARTTLS.")
    username_env: str | None = Field(
        default=None, description=f"Environment variable ({ALERT_ENV_PREFIX}*) holding the "
        "user name.")
    password_env: str | None = Field(
        default=None, description=f"Environment variable ({ALERT_ENV_PREFIX}*) holding the "
        "password.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not HOSTNAME.match(value):
            raise ValueError(f"{value!r} is not a host name or address")
        return value

    @field_validator("username_env", "password_env")
    @classmethod
    def _credential_names(cls, value: str | None) -> str | None:
        return value if value is None else _check_env_name(value)

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return _check_email(value)

    @field_validator("to")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        return [_check_email(address) for address in value]


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
    """Where a pipeline's alerts go (either channel or both) and which events are sent."""

    events: list[AlertEvent] = Field(default_factory=lambda: list(EVENTS), min_length=1)
    smtp: SmtpAlerts | None = None
    webhook: WebhookAlerts | None = None

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicated entries in {value}")
        return value


def _secret(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    value = alert_secret(name)
    if value is None:
        raise RuntimeError(f"{what}: environment variable {name} is not set")
    return value


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def render_subject(pipeline: str, event: str, message: str) -> str:
    """``[airmlops] churn: retraining_decision: <first line of the message>`` (one line)."""
    return _one_line(f"{SUBJECT_PREFIX} {pipeline}: {event}: {message}")


def render_body(pipeline: str, event: str, message: str, details: Mapping[str, Any]) -> str:
    return (f"Pipeline: {pipeline}\nEvent: {event}\n\n{message[:MAX_MESSAGE_CHARS]}\n\n"
            f"Details:\n{json.dumps(dict(details), indent=2, sort_keys=True, default=str)}\n")


def send_email(config: SmtpAlerts, subject: str, body: str) -> None:
    """Send one plain-text e-mail through the relay (STARTTLS and login when configured)."""
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


def notify(spec: PipelineSpec, event: AlertEvent, message: str,
           details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Send ``event`` of ``spec``'s pipeline to every configured channel; never raises.

    Returns ``{"event", "sent": [channels], "errors": {channel: message}, "skipped": why}``:
    skipped when the spec has no ``alerts`` or does not subscribe to the event.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r}; expected one of {list(EVENTS)}")
    result: dict[str, Any] = {"event": event, "sent": [], "errors": {}, "skipped": None}
    config: AlertsConfig | None = getattr(spec, "alerts", None)
    if config is None or (config.smtp is None and config.webhook is None):
        result["skipped"] = "no alerts configured"
        return result
    if event not in config.events:
        result["skipped"] = f"event {event} not subscribed"
        return result
    details = dict(details or {})
    message = str(message)[:MAX_MESSAGE_CHARS]
    if config.smtp is not None:
        try:
            send_email(config.smtp, render_subject(spec.name, event, message),
                       render_body(spec.name, event, message, details))
            result["sent"].append("smtp")
        except Exception as error:  # an alert must never fail the step that raised it
            result["errors"]["smtp"] = f"{type(error).__name__}: {error}"
    if config.webhook is not None:
        payload = {"source": "airmlops", "pipeline": spec.name, "event": event,
                   "message": message, "details": json.loads(json.dumps(details, default=str))}
        try:
            post_webhook(config.webhook, payload)
            result["sent"].append("webhook")
        except Exception as error:
            result["errors"]["webhook"] = f"{type(error).__name__}: {error}"
    for channel, error in result["errors"].items():
        log.warning("alert %s of %s could not be sent by %s: %s", event, spec.name, channel,
                    error)
    if result["sent"]:
        log.info("alert %s of %s sent by %s", event, spec.name, ", ".join(result["sent"]))
    return result
