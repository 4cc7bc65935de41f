"""The fault-injection suite's equipment: steady load, a Redis that can be killed and brought
back, an alert receiver, and the results table (fixtures in conftest.py).

``deployment`` deploys the test model's bento (:mod:`model_service_fixtures`) through
:func:`airmlops.serving.deploy.deploy` as the platform does: process target, two servers of
two workers each, the supervisor watching, alerts to a loopback webhook, the prediction log on a
Redis server this suite owns (append-only file, fsync always, so a ``kill -9`` of Redis loses
nothing Redis acknowledged). ``LoadGenerator`` sends /predict at a steady rate through the
stable address and records every answer. Each test adds one row to ``benchmarks/results/
chaos.md`` (fault, failed requests, longest failure streak, time to recover, data lost, alert).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from airmlops.platform import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"
NOW = dt.datetime(2026, 6, 2, tzinfo=dt.UTC)
RATE = 50.0
"""Requests per second of the steady load (bounded: each fault runs for seconds, not minutes)."""
CLIENT_TIMEOUT = 2.0


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultResult:
    fault: str
    requests: int
    failed: int
    failure_seconds: float
    recover_seconds: float | None
    data_lost: str
    alert: str
    target: str


def write_results(rows: list[FaultResult]) -> None:
    """benchmarks/results/chaos.md and chaos.json from the faults of this run."""
    if not rows:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Fault injection (`make chaos`, tests/chaos)",
        "",
        f"Steady load of {RATE:g} req/s through the stable address (client timeout "
        f"{CLIENT_TIMEOUT:g} s); process target, one server and one hot spare of 2 workers "
        "each (the demo spec's defaults), supervisor on. "
        f"Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        "| fault | requests | failed | longest failure streak (s) | time to recover (s) | "
        "data lost | alert sent | target |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        recover = "-" if row.recover_seconds is None else f"{row.recover_seconds:.2f}"
        lines.append(f"| {row.fault} | {row.requests} | {row.failed} | "
                     f"{row.failure_seconds:.2f} | {recover} | {row.data_lost} | {row.alert} | "
                     f"{row.target} |")
    (RESULTS / "chaos.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "chaos.json").write_text(
        json.dumps([dataclasses.asdict(row) for row in rows], indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    at: float
    status: int  # 0: no answer (refused, reset, timeout)
    request_id: str | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class LoadGenerator:
    """POSTs /predict at :data:`RATE` per second from one thread until stopped."""

    def __init__(self, url: str, entities: list[str], rate: float = RATE,
                 body: dict[str, Any] | None = None) -> None:
        self.url, self.entities, self.interval = url, entities, 1.0 / rate
        self.body = body  # a fixed body instead of the demo model's instances
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        index = 0
        next_at = time.monotonic()
        with httpx.Client(timeout=CLIENT_TIMEOUT, trust_env=False) as client:
            while not self._stop.is_set():
                index += 1
                body = self.body or {"instances": [{
                    "customer_id": self.entities[index % len(self.entities)],
                    "tenure_days": 100 + index % 50}]}
                started = time.monotonic()
                try:
                    response = client.post(f"{self.url}/predict", json=body)
                    request_id = None
                    if response.status_code == 200 and self.body is None:
                        request_id = response.json().get("request_id")
                    answer = Answer(started, response.status_code, request_id,
                                    "" if response.status_code == 200 else response.text[:200])
                except httpx.HTTPError as exc:
                    answer = Answer(started, 0, None, type(exc).__name__)
                self.answers.append(answer)
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_at = time.monotonic()

    def since(self, moment: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.at >= moment]


def failure_streak(answers: list[Answer]) -> tuple[int, float, float | None, float | None]:
    """(failed, seconds from the first failure to the last, first failure time, the first
    success after the last failure)."""
    failed = [a for a in answers if not a.ok]
    if not failed:
        return 0, 0.0, None, None
    last = failed[-1].at
    recovered = next((a.at for a in answers if a.ok and a.at > last), None)
    return len(failed), last - failed[0].at, failed[0].at, recovered


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


# --------------------------------------------------------------------------------------------
# An alert receiver and a Redis this suite can kill
# --------------------------------------------------------------------------------------------


class AlertReceiver:
    """A loopback webhook that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, event: str) -> list[dict[str, Any]]:
        return [a for a in list(self.received) if a.get("event") == event]

    def close(self) -> None:
        self.server.shutdown()


class KillableRedis:
    """``redis-server`` on a fixed loopback port with an fsync-always append-only file, so it
    can be killed (-9) and started again with everything it acknowledged."""

    def __init__(self, directory: Path) -> None:
        from integration.redis_fixture import _ensure_binary

        self.binary = _ensure_binary()
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--protected-mode", "yes"]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (kept by the process)
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_for(lambda: _pings(client), 30, "redis to answer PING")
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


