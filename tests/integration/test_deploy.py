"""Blue/green deploys on real processes: the stable-address proxy and BentoML model servers.

The proxy tests run the real proxy process (``python -m airmlops.serving.proxy``, started by
``ensure_proxy``) in front of small in-process HTTP servers. The deploy tests build tiny
BentoML 1.4 bentos (``fixtures/versioned_service``: answers ``{"version": "1"}`` or ``"2"``,
and a build that fails while loading) into a throwaway ``BENTOML_HOME`` and serve them with
``bentoml serve`` through :mod:`airmlops.serving.deploy`, under a bounded load; the docker
target runs the same flow on images of those bentos (built by
:func:`airmlops.serving.container.build_image` on the engine that ``scripts/ensure-docker.sh``
makes sure of, with the shared wheelhouse cache ``.data/wheelhouse``).

Measured here: a deploy is ~4-7 s (almost all of it ``bentoml serve`` becoming ready; ~2-3 s
for a container), the switch itself ~30 ms; the whole module takes ~90 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from versioned_service_fixtures import BROKEN, FIXTURE, V1, V2

from airmlops.serving import deploy as deploy_mod
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy import (
    DeployFailed,
    RollbackFailed,
    deploy,
    ensure_proxy,
    load_state,
    rollback,
    status,
    undeploy,
)

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
LATER = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
GOLDEN = [{"x": 1.0}, {"x": -2.5}, {"x": 0.0}]
READY_TIMEOUT = 60.0
BROKEN_READY_TIMEOUT = 10.0
LATENCY_BUDGET_MS = 1000.0


def free_port() -> int:
    return deploy_mod.free_port()


def answers_version(expected: str):
    """A smoke validator: the answer names ``expected`` and echoes the input."""

    def check(request: dict[str, Any], body: Any) -> bool:
        return body.get("version") == expected and body.get("x") == request["x"]

    return check


def predict(url: str, x: float = 1.0) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"x": x}, timeout=10.0, trust_env=False)


# --------------------------------------------------------------------------------------------
# Small upstreams for the proxy tests
# --------------------------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with what it received, as JSON; ``/slow`` waits first."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/slow"):
            time.sleep(0.8)
        if self.path == "/readyz" and not self.server.ready:  # type: ignore[attr-defined]
            status, payload = 503, b"not ready"
        else:
            status = 200
            payload = json.dumps(
                {
                    "name": self.server.name,  # type: ignore[attr-defined]
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode("latin-1"),
                }
            ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Echo", self.server.name)  # type: ignore[attr-defined]
        self.send_header("Keep-Alive", "timeout=5")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TrackingServer(ThreadingHTTPServer):
    """Remembers its connections, so closing the server also drops the keep-alive ones."""

    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client closing is normal
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class EchoServer:
    """A threaded HTTP/1.1 echo server on a free loopback port."""

    def __init__(self, name: str, ready: bool = True) -> None:
        self.server = _TrackingServer(("127.0.0.1", 0), _EchoHandler)
        self.server.name = name  # type: ignore[attr-defined]
        self.server.ready = ready  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server.drop_connections()


@pytest.fixture
def echo_pair() -> Iterator[tuple[EchoServer, EchoServer]]:
    blue, green = EchoServer("blue-echo"), EchoServer("green-echo")
    yield blue, green
    blue.close()
    green.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[deploy_mod.ProxyHandle]:
    """The real proxy process of a throwaway deployment, stopped afterwards."""
    handle = ensure_proxy("proxytest", free_port(), tmp_path)
    yield handle
    undeploy("proxytest", tmp_path)
    assert not deploy_mod.process_alive(handle.pid, handle.create_time)


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------


def test_proxy_forwards_requests_faithfully(proxy, echo_pair) -> None:
    blue, _ = echo_pair
    token_file = proxy.state_dir / proxy_mod.TOKEN_FILE
    assert token_file.stat().st_mode & 0o777 == 0o600

    nothing = httpx.get(f"{proxy.url}/predict", trust_env=False)
    assert nothing.status_code == 503
    assert nothing.json()["error"] == "no_upstream"

    answer = proxy_mod.switch(proxy.port, proxy.token, blue.url, "blue")
    assert answer["slot"] == "blue" and answer["upstream"] == blue.url

    response = httpx.post(
        f"{proxy.url}/predict/a%20b?q=1&q=2",
        content=b'{"x": 1}',
        headers={
            "Content-Type": "application/json",
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "X-Forwarded-For": "10.1.2.3",
        },
        trust_env=False,
    )
    assert response.status_code == 200
    assert response.headers["x-upstream-slot"] == "blue"
    assert response.headers["x-echo"] == "blue-echo"
    assert "keep-alive" not in response.headers  # hop-by-hop from the upstream is dropped
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/predict/a%20b?q=1&q=2"
    assert seen["body"] == '{"x": 1}'
    headers = seen["headers"]
    assert headers["x-custom"] == "kept"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == "8"
    assert headers["host"] == f"127.0.0.1:{blue.port}"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
    assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    for hop in ("x-hop", "proxy-authorization", "connection"):
        assert hop not in headers

    for method in ("GET", "PUT", "DELETE", "PATCH"):
        echoed = httpx.request(method, f"{proxy.url}/items/7", trust_env=False).json()
        assert echoed["method"] == method and echoed["path"] == "/items/7"
    head = httpx.head(f"{proxy.url}/predict", trust_env=False)
    assert head.status_code == 200 and head.content == b""

    routing = proxy_mod.get_state(proxy.port)
    assert routing["upstream"] == blue.url and routing["slot"] == "blue"
    assert routing["upstream_errors"] == 0


def test_proxy_admin_calls_are_authenticated_and_checked(proxy, echo_pair) -> None:
    blue, green = echo_pair
    proxy_mod.switch(proxy.port, proxy.token, blue.url, "blue")
    switch_url = f"{proxy.url}/__proxy/switch"
    body = {"upstream": green.url, "slot": "green"}

    assert httpx.post(switch_url, json=body, trust_env=False).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 43}
    assert httpx.post(switch_url, json=body, headers=wrong, trust_env=False).status_code == 401

    auth = {"Authorization": f"Bearer {proxy.token}"}
    for bad in (
        {"upstream": "http://10.0.0.8:3000", "slot": "green"},  # not loopback
        {"upstream": "http://example.com:3000", "slot": "green"},
        {"upstream": "https://127.0.0.1:3000", "slot": "green"},
        {"upstream": "http://127.0.0.1:3000/path", "slot": "green"},
        {"upstream": "http://user:pw@127.0.0.1:3000", "slot": "green"},
        {"upstream": green.url, "slot": "Green; rm -rf /"},
        {"upstream": green.url},
        [green.url],
    ):
        refused = httpx.post(switch_url, json=bad, headers=auth, trust_env=False)
        assert refused.status_code == 400, bad
        assert refused.json()["error"] == "bad_request"

    # A switch to an upstream that is not ready (or not there) is refused; routing is unchanged.
    unready = EchoServer("unready", ready=False)
    try:
        with pytest.raises(proxy_mod.ProxyAdminError) as refused_ready:
            proxy_mod.switch(proxy.port, proxy.token, unready.url, "green")
        assert refused_ready.value.status == 409
    finally:
        unready.close()
    with pytest.raises(proxy_mod.ProxyAdminError) as refused_absent:
        proxy_mod.switch(proxy.port, proxy.token, f"http://127.0.0.1:{free_port()}", "green")
    assert refused_absent.value.status == 409
    assert predict(proxy.url).headers["x-upstream-slot"] == "blue"

    assert httpx.get(f"{proxy.url}/__proxy/nope", trust_env=False).status_code == 404
    assert httpx.get(switch_url, trust_env=False).status_code == 405
    assert httpx.get(f"{proxy.url}/__proxy/healthz", trust_env=False).json() == {"status": "ok"}


def test_proxy_answers_json_errors_when_the_upstream_fails(proxy) -> None:
    doomed = EchoServer("doomed")
    proxy_mod.switch(proxy.port, proxy.token, doomed.url, "blue")
    assert predict(proxy.url).status_code == 200
    doomed.close()

    response = predict(proxy.url)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "bad_gateway"
    assert "slot blue" in response.json()["message"]

    # An oversized body is refused from its Content-Length, before it is read or forwarded.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {proxy_mod.DEFAULT_MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        )
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b'"error": "body_too_large"' in answer
    assert proxy_mod.get_state(proxy.port)["upstream_errors"] >= 1


def test_proxy_switch_under_load_fails_no_request(proxy, echo_pair) -> None:
    blue, green = echo_pair
    proxy_mod.switch(proxy.port, proxy.token, blue.url, "blue")

    # A request in flight when the switch happens finishes on the upstream it started on.
    slow: dict[str, Any] = {}
    slow_thread = threading.Thread(
        target=lambda: slow.update(response=httpx.get(f"{proxy.url}/slow", trust_env=False))
    )
    slow_thread.start()
    time.sleep(0.3)
    proxy_mod.switch(proxy.port, proxy.token, green.url, "green")
    assert predict(proxy.url).json()["name"] == "green-echo"
    slow_thread.join(timeout=10)
    assert slow["response"].status_code == 200
    assert slow["response"].json()["name"] == "blue-echo"
    assert slow["response"].headers["x-upstream-slot"] == "blue"

    load = Load(proxy.url, threads=4, max_requests=3000, max_seconds=30.0, pace=0.002)
    load.start()
    switches = 0
    deadline = time.monotonic() + 20.0
    while (load.total < 600 or switches < 10) and time.monotonic() < deadline:
        time.sleep(0.1)
        target = (blue, "blue") if switches % 2 == 0 else (green, "green")
        proxy_mod.switch(proxy.port, proxy.token, target[0].url, target[1])
        switches += 1
    load.stop()
    assert load.failures == []
    assert load.total >= 600 and switches >= 10
    assert {"blue", "green"} <= load.slots_seen
    assert proxy_mod.get_state(proxy.port)["upstream_errors"] == 0


def test_proxy_restarts_on_the_same_port_with_its_last_upstream(tmp_path, echo_pair) -> None:
    blue, _ = echo_pair
    port = free_port()
    first = ensure_proxy("restarts", port, tmp_path)
    try:
        assert ensure_proxy("restarts", port, tmp_path).pid == first.pid  # reused when alive
        proxy_mod.switch(first.port, first.token, blue.url, "blue")
        with pytest.raises(deploy_mod.DeployError, match="undeploy first"):
            ensure_proxy("restarts", free_port(), tmp_path)

        os.kill(first.pid, signal.SIGKILL)
        psutil.Process(first.pid).wait(timeout=10)
        second = ensure_proxy("restarts", port, tmp_path)
        assert second.pid != first.pid and second.url == first.url
        response = predict(second.url)
        assert response.status_code == 200 and response.headers["x-upstream-slot"] == "blue"
    finally:
        undeploy("restarts", tmp_path)
    with pytest.raises(httpx.ConnectError):
        predict(first.url)


# --------------------------------------------------------------------------------------------
# Blue/green deploys of real BentoML servers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway BentoML store holding the v1, v2 and broken builds."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run(
        [sys.executable, str(FIXTURE / "build_bento.py"), "1:ok", "2:ok", "3:init_fails"],
        env=env,
        cwd=str(home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.split() == [V1, V2, BROKEN]
    return home


class Load:
    """Bounded steady load on the stable address: a few threads, each on a keep-alive client.

    Records per thread the sequence of versions answered, and every failure (an exception or
    a non-200 answer).
    """

    def __init__(
        self, url: str, *, threads: int, max_requests: int, max_seconds: float, pace: float
    ) -> None:
        self.url = url
        self.threads = threads
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.pace = pace
        self.versions: list[list[str]] = [[] for _ in range(threads)]
        self.slots_seen: set[str] = set()
        self.failures: list[str] = []
        self.latencies_ms: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(threads)
        ]

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.versions) + len(self.failures)

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)

    def answered(self, version: str) -> int:
        return sum(v.count(version) for v in self.versions)

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=15.0, trust_env=False) as client:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                with self._lock:
                    if self.total >= self.max_requests:
                        return
                started = time.perf_counter()
                try:
                    response = client.post(f"{self.url}/predict", json={"x": float(index)})
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = (time.perf_counter() - started) * 1000.0
                with self._lock:
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        body = response.json()
                        self.versions[index].append(body.get("version") or body.get("name"))
                        self.slots_seen.add(response.headers.get("x-upstream-slot", "?"))
                        self.latencies_ms.append(elapsed)
                time.sleep(self.pace)


def recorded_processes(state: dict[str, Any]) -> list[tuple[int, float]]:
    pids = []
    if state.get("proxy"):
        pids.append((state["proxy"]["pid"], state["proxy"]["create_time"]))
    for record in state["slots"].values():
        if record:
            pids.append((record["pid"], record["create_time"]))
    return pids


def port_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def assert_all_stopped(state: dict[str, Any]) -> None:
    """Every process a deployment recorded is gone and none of its ports answers."""
    for pid, create_time in recorded_processes(state):
        assert not deploy_mod.process_alive(pid, create_time), pid
    ports = [r["port"] for r in state["slots"].values() if r]
    if state.get("proxy"):
        ports.append(state["proxy"]["port"])
    for port in ports:
        assert port_closed(port), port
    assert deploy_mod.marked_processes(deploy_mod.DEPLOYMENT_MARKER, state["deployment_id"]) == []
    artifacts = {r["artifact"] for r in state["slots"].values() if r}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        assert not artifacts & set(cmdline), cmdline


def test_blue_green_deploy_of_local_processes(tmp_path: Path, bentoml_home: Path) -> None:
    root, pipeline, port = tmp_path, "churn_demo", free_port()
    common = dict(
        root=root,
        proxy_port=port,
        latency_budget_ms=LATENCY_BUDGET_MS,
        bentoml_home=bentoml_home,
    )
    try:
        # v1: the stable address answers version 1 from the blue slot.
        first = deploy(
            pipeline,
            "1",
            V1,
            "process",
            GOLDEN,
            ready_timeout=READY_TIMEOUT,
            now=NOW,
            validate=answers_version("1"),
            **common,
        )
        print(f"\n[deploy] v1 in {first.timings}")
        assert (first.slot, first.previous_slot, first.stable_url) == (
            "blue",
            None,
            f"http://127.0.0.1:{port}",
        )
        assert first.smoke.ok and first.smoke.checked == len(GOLDEN)
        answer = predict(first.stable_url, 4.0)
        assert answer.json() == {"version": "1", "x": 4.0}
        assert answer.headers["x-upstream-slot"] == "blue"
        state_v1 = load_state(pipeline, root)
        assert state_v1["active"] == "blue"
        assert state_v1["slots"]["blue"]["model_version"] == "1"
        assert state_v1["slots"]["blue"]["started_at"] == NOW.isoformat()
        assert state_v1["slots"]["green"] is None

        # v2 while a bounded load runs against the stable address: no request fails, and
        # each client sees version 1 until the switch and version 2 after it, never back.
        load = Load(first.stable_url, threads=4, max_requests=3000, max_seconds=60.0, pace=0.02)
        load.start()
        time.sleep(1.0)
        second = deploy(
            pipeline,
            "2",
            V2,
            "process",
            GOLDEN,
            ready_timeout=READY_TIMEOUT,
            now=LATER,
            validate=answers_version("2"),
            **common,
        )
        settle = time.monotonic() + 20
        while load.answered("2") < 100 and time.monotonic() < settle:
            time.sleep(0.1)
        load.stop()
        latencies = sorted(load.latencies_ms)
        print(
            f"[deploy] v2 in {second.timings}; load: {load.total} requests, "
            f"{load.answered('1')} by v1, {load.answered('2')} by v2, "
            f"p50 {latencies[len(latencies) // 2]:.1f} ms, "
            f"p99 {latencies[int(len(latencies) * 0.99)]:.1f} ms"
        )
        assert load.failures == []
        assert 300 <= load.total <= 3000
        assert load.answered("1") > 0 and load.answered("2") >= 100
        for versions in load.versions:
            assert versions[0] == "1" and versions[-1] == "2"
            switch_at = versions.index("2")
            assert set(versions[:switch_at]) == {"1"} and set(versions[switch_at:]) == {"2"}
        assert (second.slot, second.previous_slot, second.previous_version) == (
            "green",
            "blue",
            "1",
        )
        assert predict(second.stable_url).headers["x-upstream-slot"] == "green"

        # The old version stays ready in blue, as the rollback target.
        state_v2 = load_state(pipeline, root)
        assert state_v2["active"] == "green"
        assert state_v2["slots"]["blue"] == state_v1["slots"]["blue"]
        assert predict(state_v2["slots"]["blue"]["upstream"]).json()["version"] == "1"

        # A build that cannot load its model: deploy fails, v2 keeps answering, state as before.
        with pytest.raises(DeployFailed) as failed:
            deploy(
                pipeline,
                "3",
                BROKEN,
                "process",
                GOLDEN,
                ready_timeout=BROKEN_READY_TIMEOUT,
                now=LATER,
                validate=answers_version("3"),
                **common,
            )
        assert failed.value.stage == "readiness"
        assert "not ready" in failed.value.reason
        assert "the model cannot be loaded" in failed.value.log_tail
        assert load_state(pipeline, root) == state_v2
        assert predict(second.stable_url).json()["version"] == "2"
        assert not any(
            BROKEN in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
        )

        # Rollback: version 1 (still running in blue) answers again.
        rolled = rollback(pipeline, root, now=LATER)
        assert (rolled.slot, rolled.version, rolled.restarted) == ("blue", "1", False)
        answer = predict(second.stable_url)
        assert answer.json()["version"] == "1" and answer.headers["x-upstream-slot"] == "blue"

        report = status(pipeline, root)
        assert report["active"] == "blue" and report["active_version"] == "1"
        assert report["proxy"]["alive"] and report["proxy"]["routing"]["slot"] == "blue"
        assert report["slots"]["green"]["ready"] and report["slots"]["blue"]["ready"]
        final_state = load_state(pipeline, root)
    finally:
        stopped = undeploy(pipeline, root)
    assert {"proxy", "blue", "green"} <= set(stopped)
    assert_all_stopped(final_state)
    assert load_state(pipeline, root)["active"] is None
    assert undeploy(pipeline, root) == []


def test_failed_smoke_and_rollback_to_a_stopped_version(tmp_path: Path, bentoml_home: Path) -> None:
    root, pipeline, port = tmp_path, "fraud", free_port()
    common = dict(
        root=root,
        proxy_port=port,
        ready_timeout=READY_TIMEOUT,
        latency_budget_ms=LATENCY_BUDGET_MS,
        bentoml_home=bentoml_home,
    )
    try:
        with pytest.raises(RollbackFailed):
            rollback(pipeline, root)  # nothing deployed yet
        deploy(
            pipeline, "1", V1, "process", GOLDEN, now=NOW, validate=answers_version("1"), **common
        )
        second = deploy(
            pipeline, "2", V2, "process", GOLDEN, now=NOW, validate=answers_version("2"), **common
        )

        # A version whose answers are wrong: it starts and is ready, but the smoke fails.
        before = load_state(pipeline, root)
        with pytest.raises(DeployFailed) as failed:
            deploy(
                pipeline,
                "3",
                V1,
                "process",
                GOLDEN,
                now=LATER,
                validate=answers_version("3"),
                **common,
            )
        assert failed.value.stage == "smoke"
        assert "invalid answer" in failed.value.reason
        assert load_state(pipeline, root) == before
        assert predict(second.stable_url).json()["version"] == "2"

        # An empty golden set proves nothing: refused as well.
        with pytest.raises(DeployFailed, match="no golden requests"):
            deploy(pipeline, "3", V1, "process", [], now=LATER, **common)
        assert load_state(pipeline, root) == before

        # The previous version died with the supervisor that would have restarted it:
        # rollback starts it again from its recorded bento, and the supervisor too.
        supervisor = load_state(pipeline, root)["supervisor"]
        os.kill(supervisor["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while deploy_mod.process_alive(supervisor["pid"], supervisor["create_time"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        blue = before["slots"]["blue"]
        os.killpg(blue["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while deploy_mod.process_alive(blue["pid"], blue["create_time"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rolled = rollback(pipeline, root, now=LATER)
        assert rolled.restarted and rolled.version == "1" and rolled.slot == "blue"
        after = load_state(pipeline, root)
        assert after["slots"]["blue"]["pid"] != blue["pid"]
        assert after["slots"]["blue"]["started_at"] == LATER.isoformat()
        revived = after["supervisor"]
        assert revived["pid"] != supervisor["pid"]
        assert deploy_mod.process_alive(revived["pid"], revived["create_time"])
        assert predict(second.stable_url).json()["version"] == "1"
        # ... and a second rollback rolls forward to version 2, still running in green.
        forward = rollback(pipeline, root)
        assert (forward.slot, forward.version, forward.restarted) == ("green", "2", False)
        assert predict(second.stable_url).json()["version"] == "2"
        final_state = load_state(pipeline, root)
    finally:
        undeploy(pipeline, root)
    assert_all_stopped(final_state)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pipeline", "../etc"),
        ("pipeline", "Churn"),
        ("pipeline", "churn;rm"),
        ("version", "1 2"),
        ("version", "$(id)"),
        ("artifact", "versioned_service"),  # no explicit version
        ("artifact", "versioned_service:latest"),
        ("artifact", "../bento:1"),
        ("artifact", "-rf:1"),
        ("artifact", "svc:1 --host 0.0.0.0"),
        ("target", "kubernetes"),
        ("proxy_port", 80),
        ("proxy_port", 70000),
        ("proxy_port", True),
        ("env", {"BAD NAME": "x"}),
        ("env", {"OK": "nul\x00byte"}),
        ("path", "http://elsewhere/predict"),
        ("path", "/../admin"),
    ],
)
def test_deploy_refuses_invalid_inputs_before_starting_anything(
    tmp_path: Path, field: str, value: Any
) -> None:
    arguments: dict[str, Any] = dict(
        pipeline="churn",
        version="1",
        artifact=V1,
        target="process",
        golden=GOLDEN,
        root=tmp_path,
        proxy_port=free_port(),
        ready_timeout=5.0,
        latency_budget_ms=100.0,
        now=NOW,
    )
    arguments[field] = value
    with pytest.raises(ValueError):
        deploy(**arguments)
    assert not (tmp_path / "deployments").exists()


# --------------------------------------------------------------------------------------------
# The docker target: the same flow on real images
# --------------------------------------------------------------------------------------------

def test_blue_green_deploy_of_containers(tmp_path: Path, versioned_images: dict[str, str]) -> None:
    from airmlops.serving.docker_engine import docker_client

    client = docker_client(timeout=120)
    root, pipeline, port = tmp_path, "churn_docker", free_port()
    common = dict(
        root=root, proxy_port=port, latency_budget_ms=LATENCY_BUDGET_MS, docker_client=client
    )
    try:
        first = deploy(
            pipeline,
            "1",
            versioned_images[V1],
            "docker",
            GOLDEN,
            ready_timeout=READY_TIMEOUT,
            now=NOW,
            validate=answers_version("1"),
            **common,
        )
        print(f"\n[deploy] docker v1 in {first.timings}")
        state_v1 = load_state(pipeline, root)
        blue = state_v1["slots"]["blue"]
        assert blue["target"] == "docker" and blue["pid"] is None
        container = client.containers.get(blue["container_id"])
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert container.name == blue["container_name"]
        assert container.labels[deploy_mod.LABEL_DEPLOYMENT] == state_v1["deployment_id"]
        assert predict(first.stable_url, 4.0).json() == {"version": "1", "x": 4.0}

        load = Load(first.stable_url, threads=4, max_requests=3000, max_seconds=60.0, pace=0.02)
        load.start()
        time.sleep(1.0)
        second = deploy(
            pipeline,
            "2",
            versioned_images[V2],
            "docker",
            GOLDEN,
            ready_timeout=READY_TIMEOUT,
            now=LATER,
            validate=answers_version("2"),
            **common,
        )
        settle = time.monotonic() + 20
        while load.answered("2") < 100 and time.monotonic() < settle:
            time.sleep(0.1)
        load.stop()
        print(
            f"[deploy] docker v2 in {second.timings}; load: {load.total} requests, "
            f"{load.answered('1')} by v1, {load.answered('2')} by v2"
        )
        assert load.failures == []
        assert load.answered("1") > 0 and load.answered("2") >= 100
        for versions in load.versions:
            switch_at = versions.index("2")
            assert set(versions[:switch_at]) == {"1"} and set(versions[switch_at:]) == {"2"}
        state_v2 = load_state(pipeline, root)

        with pytest.raises(DeployFailed) as failed:
            deploy(
                pipeline,
                "3",
                versioned_images[BROKEN],
                "docker",
                GOLDEN,
                ready_timeout=BROKEN_READY_TIMEOUT,
                now=LATER,
                **common,
            )
        assert failed.value.stage == "readiness"
        assert "the model cannot be loaded" in failed.value.log_tail
        assert load_state(pipeline, root) == state_v2
        assert predict(second.stable_url).json()["version"] == "2"
        broken = client.containers.list(all=True, filters={"ancestor": versioned_images[BROKEN]})
        assert broken == []

        rolled = rollback(pipeline, root, now=LATER, docker_client=client)
        assert (rolled.slot, rolled.version, rolled.restarted) == ("blue", "1", False)
        assert predict(second.stable_url).json()["version"] == "1"
        final_state = load_state(pipeline, root)
    finally:
        stopped = undeploy(pipeline, root, docker_client=client)
    assert {"proxy", "blue", "green"} <= set(stopped)
    assert_all_stopped(final_state)
    labelled = client.containers.list(
        all=True, filters={"label": f"{deploy_mod.LABEL_DEPLOYMENT}={final_state['deployment_id']}"}
    )
    assert labelled == []
    client.close()
