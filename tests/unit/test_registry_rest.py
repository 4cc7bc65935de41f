"""The MLflow REST client of the MLOps view takes its credentials from the settings' MLflow
client section (MLflow's own variables), and sends them to a real HTTP server on loopback."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airmlops.settings import MlflowClientSettings, Settings
from airmlops.training.registry_rest import RegistryError, RestRegistry


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        _Recorder.seen.append(dict(self.headers))
        body = json.dumps({"registered_model": {"name": "churn", "aliases": [
            {"alias": "champion", "version": "3"}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_token_is_sent_as_a_bearer_header(server: str):
    credentials = MlflowClientSettings(MLFLOW_TRACKING_TOKEN="tok-51c2")
    registry = RestRegistry(server, credentials=credentials)
    try:
        assert registry.aliases("churn") == {"champion": "3"}
    finally:
        registry.close()
    assert _Recorder.seen[-1]["Authorization"] == "Bearer tok-51c2"


def test_a_user_and_password_are_sent_as_basic_auth(server: str):
    credentials = MlflowClientSettings(MLFLOW_TRACKING_USERNAME="reader",
                                       MLFLOW_TRACKING_PASSWORD="pw-9")
    registry = RestRegistry(server, credentials=credentials)
    try:
        registry.aliases("churn")
    finally:
        registry.close()
    expected = base64.b64encode(b"reader:pw-9").decode()
    assert _Recorder.seen[-1]["Authorization"] == f"Basic {expected}"


def test_without_credentials_nothing_is_sent(server: str):
    registry = RestRegistry(server, credentials=MlflowClientSettings())
    try:
        registry.aliases("churn")
    finally:
        registry.close()
    assert "Authorization" not in _Recorder.seen[-1]


def test_the_environment_reaches_the_client_through_the_settings(monkeypatch, server: str):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "from-env-77")
    registry = RestRegistry(server, credentials=Settings().mlflow_client)
    try:
        registry.aliases("churn")
    finally:
        registry.close()
    assert _Recorder.seen[-1]["Authorization"] == "Bearer from-env-77"


def test_an_unreachable_server_is_a_registry_error():
    registry = RestRegistry("http://127.0.0.1:9", timeout=2, credentials=MlflowClientSettings())
    try:
        with pytest.raises(RegistryError, match="unreachable"):
            registry.aliases("churn")
    finally:
        registry.close()
