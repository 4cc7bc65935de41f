"""The supervisor alerts on a live server's prediction-log counters (``/readyz``).

A real HTTP server on loopback plays the model server (its ``/readyz`` body carries the
counters the test sets) and the alert webhook (it records what it receives); the supervisor
reads the counters on a clock the test controls. ``log_quarantined`` goes out when
``quarantined`` grows, naming the count and the quarantine folder; ``log_dropped`` when
``dropped`` grows; neither while the counters stand still.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from airmlops.serving.deploy import deployment_dir
from airmlops.serving.deploy.supervisor import (
    ALERT_EVERY,
    ALERTS_FILE,
    LOG_CHECK_INTERVAL,
    Supervisor,
)
from airmlops.serving.prediction_log import spill_dir_path

PIPELINE = "churn"


class FakeServer(ThreadingHTTPServer):
    """Answers ``GET /readyz`` with ``stats`` and records every POSTed alert."""

    daemon_threads = True

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {"logged": 10, "dropped": 0, "quarantined": 0}
        self.alerts: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"status": "ok", "prediction_log": server.stats}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                server.alerts.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _look(server: FakeServer, root: Path, counters: list[dict[str, int]]) -> list[dict[str, Any]]:
    """One read of the counters per item of ``counters``, an interval apart (each alert may go
    out); the alerts sent."""
    clock = Clock()
    supervisor = Supervisor(PIPELINE, root, clock=clock)
    state = {"active": "blue", "slots": {"blue": {"instance": "blue/1",
                                                   "upstream": server.url}}}
    try:
        for stats in counters:
            server.stats = {"logged": 10, **stats}
            clock.now += max(LOG_CHECK_INTERVAL, ALERT_EVERY)
            supervisor._check_prediction_logs(state)
    finally:
        supervisor.close()  # waits for the alerts being sent
    return server.alerts


def _deployment(tmp_path: Path, server: FakeServer) -> Path:
    directory = deployment_dir(PIPELINE, tmp_path)
    directory.mkdir(parents=True)
    (directory / ALERTS_FILE).write_text(json.dumps({"webhook": {"url": f"{server.url}/hook"}}))
    return tmp_path


def test_log_quarantined_goes_out_when_quarantined_grows_naming_count_and_folder(
        tmp_path: Path, server: FakeServer) -> None:
    root = _deployment(tmp_path, server)
    alerts = _look(server, root, [{"quarantined": 0, "dropped": 0},
                                  {"quarantined": 2, "dropped": 0},
                                  {"quarantined": 2, "dropped": 0},
                                  {"quarantined": 5, "dropped": 0}])

    assert [a["event"] for a in alerts] == ["log_quarantined", "log_quarantined"]
    folder = spill_dir_path(root, PIPELINE) / "quarantine"
    first, second = alerts
    assert "quarantined 2 prediction-log entries" in first["message"]
    assert str(folder) in first["message"]
    assert first["details"]["quarantined_total"] == 2
    assert first["details"]["quarantine_dir"] == str(folder)
    assert first["details"]["upstream"] == server.url
    assert "quarantined 3 prediction-log entries" in second["message"]
    assert second["details"]["quarantined_total"] == 5


def test_log_dropped_and_log_quarantined_are_told_apart(tmp_path: Path,
                                                        server: FakeServer) -> None:
    root = _deployment(tmp_path, server)
    alerts = _look(server, root, [{"quarantined": 0, "dropped": 0},
                                  {"quarantined": 0, "dropped": 4}])

    assert [a["event"] for a in alerts] == ["log_dropped"]
    assert alerts[0]["details"]["dropped_total"] == 4
