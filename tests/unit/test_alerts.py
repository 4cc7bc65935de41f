"""Alerts for real over loopback: a tiny SMTP sink and an HTTP sink on 127.0.0.1 (in threads).

The SMTP sink speaks just enough SMTP for smtplib (EHLO with AUTH PLAIN, MAIL, RCPT, DATA,
QUIT) and keeps every message it accepts, with the credentials it was given.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from airmlops.alerts import (
    EVENTS,
    AlertsConfig,
    SmtpAlerts,
    WebhookAlerts,
    notify,
    notify_config,
    render_subject,
)
from airmlops.spec import SpecError, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]


class _SmtpHandler(socketserver.StreamRequestHandler):
    def _say(self, line: str) -> None:
        self.wfile.write(f"{line}\r\n".encode())

    def handle(self) -> None:
        server: SmtpSink = self.server  # type: ignore[assignment]
        envelope: dict[str, Any] = {"rcpt": [], "auth": None}
        self._say("220 sink ESMTP")
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self._say("250-sink")
                self._say("250 AUTH PLAIN")
            elif verb == "HELO":
                self._say("250 sink")
            elif verb == "AUTH":
                _, _, credentials = line.split(" ", 2)
                _, user, password = base64.b64decode(credentials).decode().split("\0")
                envelope["auth"] = (user, password)
                self._say("235 ok")
            elif verb == "MAIL":
                envelope["from"] = line.split(":", 1)[1].strip()
                self._say("250 ok")
            elif verb == "RCPT":
                envelope["rcpt"].append(line.split(":", 1)[1].strip())
                self._say("250 ok")
            elif verb == "DATA":
                self._say("354 go on")
                lines = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                envelope["message"] = email.message_from_bytes(b"".join(lines),
                                                               policy=email.policy.default)
                server.messages.append(dict(envelope))
                self._say("250 queued")
            elif verb == "RSET" or verb == "NOOP":
                self._say("250 ok")
            elif verb == "QUIT":
                self._say("221 bye")
                return
            else:
                self._say("502 not implemented")


class SmtpSink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SmtpHandler)
        self.messages: list[dict[str, Any]] = []

    @property
    def port(self) -> int:
        return self.server_address[1]


class HttpSink(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 204

        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                sink.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": json.loads(self.rfile.read(length))})
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/mlops"


def serve_in_thread(server: socketserver.BaseServer) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    yield from serve_in_thread(SmtpSink())


@pytest.fixture
def http_sink() -> Iterator[HttpSink]:
    yield from serve_in_thread(HttpSink())


def _spec(alerts: dict[str, Any] | None):
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    if alerts is not None:
        data["alerts"] = alerts
    return parse_spec(data)


def _smtp(sink: SmtpSink, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": sink.port, "from": "mlops@example.com",
            "to": ["ml-team@example.com", "oncall@example.com"], **extra}


def test_a_retraining_decision_is_mailed_with_its_details(smtp_sink):
    spec = _spec({"smtp": _smtp(smtp_sink)})
    result = notify(spec, "retraining_decision", "2 of last 3 windows breached",
                    {"window_id": "20260601T1000-20260601T1100", "drift_share": 0.44})
    assert result == {"event": "retraining_decision", "sent": ["smtp"], "errors": {},
                      "skipped": None}
    [mail] = smtp_sink.messages
    assert mail["from"] == "<mlops@example.com>"
    assert mail["rcpt"] == ["<ml-team@example.com>", "<oncall@example.com>"]
    assert mail["auth"] is None
    message = mail["message"]
    assert message["Subject"] == ("[airmlops] churn: retraining_decision: 2 of last 3 windows "
                                  "breached")
    assert message["To"] == "ml-team@example.com, oncall@example.com"
    body = message.get_content()
    assert "Event: retraining_decision" in body
    assert '"window_id": "20260601T1000-20260601T1100"' in body
    assert '"drift_share": 0.44' in body


def test_smtp_credentials_come_from_the_environment_never_the_spec(smtp_sink, monkeypatch):
    monkeypatch.setenv("MLOPS_ALERT_SMTP_USER", "relay-user")
    monkeypatch.setenv("MLOPS_ALERT_SMTP_PASSWORD", "s3cret-relay-password")
    spec = _spec({"smtp": _smtp(smtp_sink, username_env="MLOPS_ALERT_SMTP_USER",
                                password_env="MLOPS_ALERT_SMTP_PASSWORD")})
    assert notify(spec, "quarantine", "batch quarantined", {})["sent"] == ["smtp"]
    assert smtp_sink.messages[0]["auth"] == ("relay-user", "s3cret-relay-password")
    assert "s3cret" not in json.dumps(spec.model_dump(mode="json"))

    monkeypatch.delenv("MLOPS_ALERT_SMTP_PASSWORD")
    result = notify(spec, "quarantine", "batch quarantined", {})
    assert result["sent"] == []
    assert "MLOPS_ALERT_SMTP_PASSWORD is not set" in result["errors"]["smtp"]
    assert len(smtp_sink.messages) == 1


def test_a_webhook_gets_the_event_as_json_with_headers_from_the_environment(http_sink,
                                                                            monkeypatch):
    monkeypatch.setenv("MLOPS_ALERT_HOOK_AUTH", "Bearer hook-token")
    spec = _spec({"webhook": {"url": http_sink.url,
                              "headers_from_env": {"Authorization": "MLOPS_ALERT_HOOK_AUTH"}}})
    result = notify(spec, "not_blessed", "challenger below the champion",
                    {"version": "7", "roc_auc": 0.71})
    assert result["sent"] == ["webhook"] and result["errors"] == {}
    [request] = http_sink.requests
    assert request["path"] == "/hooks/mlops"
    assert request["headers"]["Authorization"] == "Bearer hook-token"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {"source": "airmlops", "pipeline": "churn", "event": "not_blessed",
                               "message": "challenger below the champion",
                               "details": {"version": "7", "roc_auc": 0.71}}


def test_both_channels_and_one_failing_does_not_stop_the_other(smtp_sink, http_sink):
    spec = _spec({"smtp": _smtp(smtp_sink), "webhook": {"url": http_sink.url}})
    assert notify(spec, "rollback", "version 3 rolled back", {})["sent"] == ["smtp", "webhook"]

    http_sink.status = 500
    result = notify(spec, "rollback", "again", {})
    assert result["sent"] == ["smtp"]
    assert "500" in result["errors"]["webhook"]

    http_sink.status = 204
    closed = _smtp(smtp_sink, port=1)  # nothing listens on port 1
    spec = _spec({"smtp": closed, "webhook": {"url": http_sink.url}})
    result = notify(spec, "rollback", "relay down", {})
    assert result["sent"] == ["webhook"]
    assert "smtp" in result["errors"]
    assert len(smtp_sink.messages) == 2 and len(http_sink.requests) == 3


def test_starttls_against_a_relay_without_it_is_reported_not_raised(smtp_sink):
    spec = _spec({"smtp": _smtp(smtp_sink, use_tls=True)})
    result = notify(spec, "quarantine", "x", {})
    assert result["sent"] == [] and "STARTTLS" in result["errors"]["smtp"]
    assert smtp_sink.messages == []


def test_unsubscribed_events_and_missing_config_send_nothing(smtp_sink):
    spec = _spec({"events": ["rollback"], "smtp": _smtp(smtp_sink)})
    assert notify(spec, "quarantine", "x", {})["skipped"] == "event quarantine not subscribed"
    assert notify(_spec(None), "rollback", "x", {})["skipped"] == "no alerts configured"
    assert smtp_sink.messages == []
    with pytest.raises(ValueError, match="unknown alert event"):
        notify(spec, "deployed", "x", {})


def test_the_subject_is_one_line_whatever_the_message():
    subject = render_subject("churn", "quarantine", "bad\r\nBcc: victim@example.com\nbatch")
    assert "\n" not in subject and "\r" not in subject
    assert subject == "[airmlops] churn: quarantine: bad Bcc: victim@example.com batch"


@pytest.mark.parametrize("url, ok", [
    ("https://hooks.example.com/x", True),
    ("http://127.0.0.1:9000/x", True),
    ("http://127.8.0.1/x", True),
    ("http://localhost:9000/x", True),
    ("http://[::1]:9000/x", True),
    ("http://hooks.example.com/x", False),
    ("http://10.0.0.5/x", False),
    ("https://user:pw@hooks.example.com/x", False),
    ("ftp://127.0.0.1/x", False),
])
def test_webhook_urls_are_loopback_or_https(url, ok):
    if ok:
        assert WebhookAlerts(url=url).url == url
    else:
        with pytest.raises(ValueError):
            WebhookAlerts(url=url)


def test_spec_errors_name_the_alerts_field():
    with pytest.raises(SpecError) as error:
        _spec({"webhook": {"url": "https://h.example.com",
                           "headers_from_env": {"Authorization": "Bearer abc.def"}}})
    assert "alerts.webhook.headers_from_env" in str(error.value)
    assert "MLOPS_ALERT_<NAME>" in str(error.value)
    with pytest.raises(SpecError, match=r"alerts\.smtp\.to"):
        _spec({"smtp": {"host": "relay", "from": "a@example.com", "to": ["not-an-address"]}})
    with pytest.raises(SpecError, match=r"alerts\.events"):
        _spec({"events": ["deployed"], "webhook": {"url": "https://h.example.com"}})
    config = AlertsConfig.model_validate({"smtp": {"host": "relay.example.com",
                                                   "from": "a@example.com", "to": ["b@x.io"]}})
    assert config.smtp.sender == "a@example.com" and config.smtp.port == 25
    assert config.events == list(EVENTS)


@pytest.mark.parametrize("env_name", [
    "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "MLOPS_SERVING_TOKEN",
    "SMTP_PASSWORD", "MLOPS_ALERT_", "mlops_alert_x", "MLOPS_ALERT_X-Y",
])
@pytest.mark.parametrize("field", ["username_env", "password_env", "headers_from_env"])
def test_alert_credentials_name_only_mlops_alert_variables(field, env_name):
    channel = ({"webhook": {"url": "https://h.example.com",
                            "headers_from_env": {"Authorization": env_name}}}
               if field == "headers_from_env" else
               {"smtp": {"host": "relay", "from": "a@example.com", "to": ["b@example.com"],
                         field: env_name}})
    with pytest.raises(SpecError) as error:
        _spec(channel)
    assert f".{field}" in str(error.value) and "MLOPS_ALERT_<NAME>" in str(error.value)


def test_the_alert_prefix_is_no_setting_of_the_platform():
    from airmlops.settings import Settings, alert_secret

    assert not [name for name in Settings.model_fields if name.startswith("alert_")]
    with pytest.raises(ValueError, match="MLOPS_ALERT_<NAME>"):
        alert_secret("AIRFLOW__CORE__FERNET_KEY")


def test_every_event_exists_and_a_spec_takes_them_all_by_default():
    assert EVENTS == ("quarantine", "not_blessed", "rollback", "retraining_decision",
                      "task_failed", "slot_died", "proxy_died", "failover",
                      "serving_unavailable", "log_dropped", "log_quarantined",
                      "shadow_awaiting_decision")
    assert _spec({"webhook": {"url": "https://h.example.com"}}).alerts.events == list(EVENTS)
    spec = _spec({"events": ["task_failed", "slot_died", "log_dropped"],
                  "webhook": {"url": "https://h.example.com"}})
    assert spec.alerts.events == ["task_failed", "slot_died", "log_dropped"]
    assert spec.alerts.sends("slot_died") and not spec.alerts.sends("quarantine")
    assert not AlertsConfig().sends("task_failed"), "no channel: nothing is sent"


@pytest.mark.parametrize("event", ["slot_died", "proxy_died", "failover", "serving_unavailable",
                                   "log_dropped", "task_failed"])
def test_notify_config_sends_from_a_pipeline_name_and_a_config(http_sink, smtp_sink, event):
    config = AlertsConfig.model_validate({"smtp": _smtp(smtp_sink),
                                          "webhook": {"url": http_sink.url}})
    result = notify_config("churn", config, event, "blue died\nrestarted",
                           {"slot": "blue", "restarts": 2})
    assert result == {"event": event, "sent": ["smtp", "webhook"], "errors": {},
                      "skipped": None}
    [request] = http_sink.requests
    assert request["body"] == {"source": "airmlops", "pipeline": "churn", "event": event,
                               "message": "blue died\nrestarted",
                               "details": {"slot": "blue", "restarts": 2}}
    [mail] = smtp_sink.messages
    assert mail["message"]["Subject"] == f"[airmlops] churn: {event}: blue died restarted"


def test_notify_config_skips_without_config_channel_or_subscription(http_sink):
    assert notify_config("churn", None, "slot_died", "x")["skipped"] == "no alerts configured"
    assert notify_config("churn", AlertsConfig(), "slot_died", "x")["skipped"] == (
        "no alerts configured")
    config = AlertsConfig(events=["task_failed"], webhook={"url": http_sink.url})
    assert notify_config("churn", config, "failover", "x")["skipped"] == (
        "event failover not subscribed")
    assert http_sink.requests == []
    with pytest.raises(ValueError, match="unknown alert event"):
        notify_config("churn", config, "deployed", "x")


def test_notify_of_a_spec_is_notify_config_of_its_name_and_alerts(http_sink):
    spec = _spec({"webhook": {"url": http_sink.url}})
    assert notify(spec, "quarantine", "q", {"rows": 3}) == notify_config(
        spec.name, spec.alerts, "quarantine", "q", {"rows": 3})
    first, second = (request["body"] for request in http_sink.requests)
    assert first == second and first["pipeline"] == "churn"


@pytest.mark.parametrize("alerts", [
    {"webhook": {"url": "http://127.0.0.1:9/x"}},
    {"events": ["slot_died", "failover"],
     "smtp": {"host": "relay.example.com", "port": 587, "use_tls": True,
              "from": "mlops@example.com", "to": ["a@example.com", "b@example.com"],
              "username_env": "MLOPS_ALERT_U", "password_env": "MLOPS_ALERT_P",
              "timeout_seconds": 3},
     "webhook": {"url": "https://hooks.example.com/x",
                 "headers_from_env": {"Authorization": "MLOPS_ALERT_HOOK"}}},
    {"smtp": {"conn_id": "smtp_alerts", "to": ["a@example.com"]}},
    {"smtp": {"conn_id": "smtp_alerts", "from": "mlops@example.com", "to": ["a@example.com"]}},
])
def test_the_config_a_deploy_saves_as_json_validates_back_to_itself(alerts):
    config = _spec(alerts).alerts
    saved = json.loads(json.dumps(config.model_dump(by_alias=True, mode="json")))
    assert AlertsConfig.model_validate(saved) == config
    assert AlertsConfig.model_validate(config.model_dump()) == config


def test_smtp_through_an_airflow_connection_needs_no_host():
    smtp = SmtpAlerts.model_validate({"conn_id": "smtp_alerts", "to": ["a@example.com"]})
    assert smtp.host is None and smtp.sender is None and smtp.conn_id == "smtp_alerts"
    direct = SmtpAlerts.model_validate({"host": "relay", "from": "a@example.com",
                                        "to": ["b@example.com"]})
    assert direct.conn_id is None


@pytest.mark.parametrize("smtp, error", [
    ({"to": ["a@example.com"]},
     "host and from are required unless conn_id names an Airflow SMTP connection"),
    ({"from": "a@example.com", "to": ["a@example.com"]}, "host is required unless conn_id"),
    ({"host": "relay", "to": ["a@example.com"]}, "from is required unless conn_id"),
    ({"conn_id": "smtp_alerts", "host": "relay", "to": ["a@example.com"]},
     "conn_id 'smtp_alerts' sends through that Airflow connection, which holds the relay's "
     "settings and credentials: remove host"),
    ({"conn_id": "smtp_alerts", "port": 587, "use_tls": True, "to": ["a@example.com"]},
     "remove port, use_tls"),
    ({"conn_id": "smtp_alerts", "username_env": "MLOPS_ALERT_U",
      "password_env": "MLOPS_ALERT_P", "to": ["a@example.com"]},
     "remove username_env, password_env"),
    ({"conn_id": "smtp_alerts", "timeout_seconds": 3, "to": ["a@example.com"]},
     "remove timeout_seconds"),
    ({"conn_id": "smtp alerts", "to": ["a@example.com"]}, "is not an Airflow connection id"),
    ({"conn_id": "../etc/passwd", "to": ["a@example.com"]}, "is not an Airflow connection id"),
    ({"conn_id": "", "to": ["a@example.com"]}, "is not an Airflow connection id"),
    ({"conn_id": "smtp_alerts", "to": []}, "alerts.smtp.to"),
    ({"conn_id": "smtp_alerts", "from": "not-an-address", "to": ["a@example.com"]},
     "is not an e-mail address"),
])
def test_smtp_is_either_a_relay_or_a_connection(smtp, error):
    with pytest.raises(SpecError) as raised:
        _spec({"smtp": smtp})
    assert "alerts.smtp" in str(raised.value)
    assert error in str(raised.value)
