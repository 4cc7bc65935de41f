"""The stable-address proxy knows its upstreams: round robin, health checks, retry, failover,
503 with Retry-After, its own metrics and per-slot bake statistics, on real processes.

Every test runs the real proxy (``python -m airmlops.serving.proxy``, health checks every
0.1 s) in front of tiny upstream processes (:data:`UPSTREAM_SCRIPT`: ``http.server`` on a free
loopback port answering ``/readyz`` and ``/predict`` with its own name). Faults are real too:
an upstream is killed with SIGKILL, or exits in the middle of a request, and is started again on
the same port. Waits poll against deadlines; no sleep decides an outcome.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_process import ProxyProcess, started_proxies, wait_until

from airmlops.platform import free_port
from airmlops.serving import proxy as proxy_mod

pytestmark = pytest.mark.integration

HEALTH_INTERVAL = 0.1
WAIT = 15.0
"""Longest any condition is waited for: far above what it needs, so a hang fails the test."""

UPSTREAM_SCRIPT = r'''
"""A model-service stand-in: ``python upstream.py PORT NAME [unready]``.

``/readyz`` answers 200 (503 with ``unready``); every other path answers ``{"name": NAME}``.
A JSON body may ask for ``sleep_ms`` first, a ``status``, or ``die`` (when it names this
server: the process exits without answering, as a worker killed mid-request would).
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, NAME = int(sys.argv[1]), sys.argv[2]
READY = sys.argv[3:] != ["unready"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        request = json.loads(self.rfile.read(length)) if length else {}
        if self.path == "/readyz":
            status, payload = (200 if READY else 503), {"ready": READY}
        else:
            if request.get("die") == NAME:
                os._exit(1)
            time.sleep(request.get("sleep_ms", 0) / 1000)
            status, payload = request.get("status", 200), {"name": NAME}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
'''


def answers(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1.0, trust_env=False).status_code
    except httpx.HTTPError:
        return None


class Upstream:
    """One upstream process on its own loopback port; it can be killed and started again."""

    def __init__(self, script: Path, name: str, *, ready: bool = True) -> None:
        self.script, self.name, self.ready = script, name, ready
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = [sys.executable, str(self.script), str(self.port), self.name]
        self.process = subprocess.Popen(argv + ([] if self.ready else ["unready"]),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: answers(f"{self.url}/readyz") is not None, f"{self.name} to start")

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its port refuses connections)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT)

    def wait_exited(self) -> None:
        assert self.process is not None
        self.process.wait(timeout=WAIT)


class Proxy(ProxyProcess):
    """The real proxy process, checking its upstreams every ``HEALTH_INTERVAL`` s."""

    health_interval = HEALTH_INTERVAL

    def predict(self, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/predict", json=body, timeout=10.0, trust_env=False)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/__proxy/metrics``, parsed by prometheus_client's own parser."""
        text = httpx.get(f"{self.url}/__proxy/metrics", timeout=5.0, trust_env=False).text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def upstream_health(self, slot: str) -> dict[str, bool]:
        return {u["url"]: u["healthy"] for u in self.state()["slots"][slot]["upstreams"]}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "upstream.py"
    path.write_text(UPSTREAM_SCRIPT)
    return path


@pytest.fixture
def upstream(script: Path) -> Iterator[Callable[..., Upstream]]:
    """Start upstreams by name; all are killed afterwards."""
    started: list[Upstream] = []

    def start(name: str, *, ready: bool = True) -> Upstream:
        started.append(Upstream(script, name, ready=ready))
        return started[-1]

    yield start
    for one in started:
        if one.process is not None and one.process.poll() is None:
            one.kill()


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start proxies (each with its own state directory unless given one); all are stopped."""
    yield from started_proxies(Proxy, tmp_path)


@pytest.fixture
def proxy(proxy_factory: Callable[..., Proxy]) -> Proxy:
    return proxy_factory()


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class Load:
    """``threads`` clients POSTing to the proxy until stopped; every failure is kept."""

    def __init__(self, url: str, threads: int = 4, **body: Any) -> None:
        self.url, self.body = url, body
        self.total = 0
        self.failures: list[str] = []
        self.names: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/predict", json=self.body)
                    failure = None if response.status_code == 200 else (
                        f"{response.status_code} {response.text}")
                except httpx.HTTPError as exc:
                    response, failure = None, repr(exc)
                with self._lock:
                    self.total += 1
                    if failure:
                        self.failures.append(failure)
                    else:
                        self.names[response.json()["name"]] += 1  # type: ignore[union-attr]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=WAIT)

    def wait_for(self, more: int) -> None:
        """Wait until ``more`` requests beyond those answered so far have been answered."""
        target = self.total + more
        wait_until(lambda: self.total >= target, f"{more} more requests")


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def test_round_robin_over_the_upstreams_of_the_active_slot(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    answer = proxy_mod.switch(proxy.port, proxy.token, [a.url, b.url], "green", version="7")
    assert answer["slot"] == "green" and answer["upstreams"] == [a.url, b.url]
    assert answer["upstream"] == a.url and answer["previous"] is None

    served = [proxy.predict() for _ in range(20)]
    assert {r.status_code for r in served} == {200}
    assert {r.headers["x-upstream-slot"] for r in served} == {"green"}
    names = [r.json()["name"] for r in served]
    assert all(first != second for first, second in itertools.pairwise(names)), names
    assert Counter(names) == {"a": 10, "b": 10}

    state = proxy.state()
    assert (state["active"], state["slot"], state["version"]) == ("green", "green", "7")
    assert state["upstream"] == a.url and state["routing"] == "ok"
    assert state["slots"] == {"green": {"version": "7", "active": True, "spares": 0, "upstreams": [
        {"url": url, "healthy": True, "consecutive_failures": 0, "last_error": None}
        for url in (a.url, b.url)]}}
    assert state["stats"]["green"]["requests"] == 20
    assert proxy_mod.healthz(proxy.port) and proxy_mod.livez(proxy.port)


def test_a_hot_spare_is_idle_until_no_replica_is_healthy(proxy, upstream) -> None:
    a, spare = upstream("a"), upstream("spare")
    proxy_mod.switch(proxy.port, proxy.token, [a.url, spare.url], "green", version="7",
                     spares=1)
    assert proxy.state()["slots"]["green"]["spares"] == 1
    assert {proxy.predict().json()["name"] for _ in range(10)} == {"a"}
    with Load(proxy.url) as load:
        load.wait_for(20)
        a.kill()
        load.wait_for(50)
    assert load.failures == []
    assert load.names["spare"] > 0
    state = proxy.state()
    assert state["routing"] == "failover" and state["failovers"] > 0
    a.start()  # back: the spare is idle again
    wait_until(lambda: proxy.state()["routing"] == "ok", "the replica to be healthy again")
    assert {proxy.predict().json()["name"] for _ in range(10)} == {"a"}


def test_a_request_whose_only_replica_died_is_retried_on_the_spare(proxy, upstream) -> None:
    a, spare = upstream("a"), upstream("spare")
    proxy_mod.switch(proxy.port, proxy.token, [a.url, spare.url], "green", version="7",
                     spares=1)
    answer = proxy.predict(die="a")  # the replica's process exits with the request
    assert answer.status_code == 200 and answer.json()["name"] == "spare"
    assert proxy.state()["retries"] == 1


@pytest.mark.parametrize("spares", [-1, 2, True, "1"])
def test_spares_must_leave_a_serving_upstream(proxy, upstream, spares) -> None:
    a, b = upstream("a"), upstream("b")
    body = {"slot": "green", "upstreams": [a.url, b.url], "spares": spares}
    refused = proxy.admin("switch", body)
    assert refused.status_code == 400 and "spares" in refused.json()["message"]
    refused = proxy.admin("register", {**body, "slot": "blue"})
    assert refused.status_code == 400 and "spares" in refused.json()["message"]


def test_the_old_switch_body_and_call_still_work(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    answer = proxy.admin("switch", {"upstream": a.url, "slot": "blue"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["slot"] == "blue" and answer.json()["upstream"] == a.url
    state = proxy.state()
    assert (state["active"], state["version"], state["upstream"]) == ("blue", None, a.url)
    assert proxy.predict().json()["name"] == "a"

    answer = proxy_mod.switch(proxy.port, proxy.token, b.url, "green", verify=False)
    assert answer["previous"] == {"slot": "blue", "url": a.url, "version": None,
                                  "upstreams": [a.url]}
    assert proxy.predict().headers["x-upstream-slot"] == "green"
    assert set(proxy.state()["slots"]) == {"blue", "green"}  # the old slot stays known


def test_nothing_deployed_is_alive_but_not_healthy(proxy) -> None:
    assert proxy_mod.livez(proxy.port) and not proxy_mod.healthz(proxy.port)
    health = httpx.get(f"{proxy.url}/__proxy/healthz", trust_env=False)
    assert health.status_code == 503 and health.json()["status"] == "empty"
    refused = proxy.predict()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "no_upstream"
    samples = proxy.metrics()
    assert metric(samples, "airmlops_proxy_unavailable_total") == 1
    assert metric(samples, "airmlops_proxy_requests_total", slot="", code_class="5xx") == 1


# --------------------------------------------------------------------------------------------
# Health, retry, failover, 503
# --------------------------------------------------------------------------------------------


def test_killing_a_replica_under_load_fails_no_request(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    proxy_mod.switch(proxy.port, proxy.token, [a.url, b.url], "green", version="7")
    with Load(proxy.url, threads=4, sleep_ms=5) as load:
        load.wait_for(100)
        a.kill()
        load.wait_for(200)
        assert proxy.upstream_health("green") == {a.url: False, b.url: True}
        a.start()  # on the same port: the next good check brings it back
        wait_until(lambda: proxy.upstream_health("green")[a.url], "a to be healthy again")
        seen = load.names["a"]
        load.wait_for(50)
    assert load.failures == []
    assert load.names["a"] > seen  # traffic came back to the restarted replica
    state = proxy.state()
    assert state["retries"] >= 1 and state["upstream_errors"] == 0
    assert state["stats"]["green"]["errors"] == 0
    assert state["slots"]["green"]["upstreams"][0]["last_error"]


def test_a_post_whose_worker_died_is_retried_once_and_a_timeout_is_not(
    proxy_factory, upstream
) -> None:
    proxy = proxy_factory("--read-timeout", "0.5")
    a, b = upstream("a"), upstream("b")
    proxy_mod.switch(proxy.port, proxy.token, [a.url, b.url], "green", version="7")

    # Each of a and b gets one of two requests; a exits on it without answering.
    served = [proxy.predict(die="a"), proxy.predict(die="a")]
    assert [r.status_code for r in served] == [200, 200]
    assert [r.json()["name"] for r in served] == ["b", "b"]
    a.wait_exited()
    assert proxy.state()["retries"] == 1
    wait_until(lambda: not proxy.upstream_health("green")[a.url], "the checks to mark a down")

    slow = proxy.predict(sleep_ms=1500)
    assert slow.status_code == 504 and slow.json()["error"] == "gateway_timeout"
    state = proxy.state()
    assert state["retries"] == 1 and state["upstream_errors"] == 1
    assert state["stats"]["green"]["errors"] == 1


def test_failover_to_a_slot_of_the_same_version(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green", version="7")
    proxy_mod.register(proxy.port, proxy.token, "blue", [b.url], "7")
    assert proxy.predict().json()["name"] == "a"

    a.kill()
    served = [proxy.predict() for _ in range(10)]
    assert [r.status_code for r in served] == [200] * 10
    assert {(r.json()["name"], r.headers["x-upstream-slot"]) for r in served} == {("b", "blue")}
    state = proxy.state()
    assert state["failovers"] == 10 and state["retries"] <= 1
    assert state["routing"] == "failover" and state["active"] == "green"
    assert proxy_mod.healthz(proxy.port)
    assert metric(proxy.metrics(), "airmlops_proxy_failovers_total") == 10

    a.start()
    wait_until(lambda: proxy.state()["routing"] == "ok", "green to serve again")
    assert proxy.predict().json()["name"] == "a"
    assert "failing over to blue" in proxy.log()


def test_no_healthy_upstream_answers_503_until_one_comes_back(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green", version="7")
    proxy_mod.register(proxy.port, proxy.token, "blue", [b.url], "6")  # another version

    a.kill()
    wait_until(lambda: not proxy_mod.healthz(proxy.port), "healthz to say unavailable")
    health = httpx.get(f"{proxy.url}/__proxy/healthz", trust_env=False)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert proxy_mod.livez(proxy.port)
    refused = [proxy.predict() for _ in range(3)]
    for response in refused:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == "no_healthy_upstream"
        assert "x-upstream-slot" not in response.headers  # blue (version 6) never served
    state = proxy.state()
    assert state["routing"] == "unavailable" and state["unavailable"] == 3
    assert state["failovers"] == 0
    assert state["stats"]["green"]["errors"] == 3 and state["stats"]["blue"]["requests"] == 0

    a.start()
    wait_until(lambda: proxy_mod.healthz(proxy.port), "healthz to say ok again")
    assert proxy.predict().json()["name"] == "a"


# --------------------------------------------------------------------------------------------
# The admin API: registration, refusals
# --------------------------------------------------------------------------------------------


def test_register_a_standby_and_remove_it(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green", version="7")
    generation = proxy.state()["generation"]

    answer = proxy_mod.register(proxy.port, proxy.token, "blue", [b.url], "6")
    assert answer["active"] == "green" and answer["removed"] is False
    state = proxy.state()
    assert state["active"] == "green" and state["generation"] == generation + 1
    assert state["slots"]["blue"]["version"] == "6" and not state["slots"]["blue"]["active"]
    assert {proxy.predict().json()["name"] for _ in range(4)} == {"a"}  # not routed to

    assert proxy_mod.register(proxy.port, proxy.token, "blue", [], None)["removed"] is True
    assert set(proxy.state()["slots"]) == {"green"}
    assert proxy_mod.register(proxy.port, proxy.token, "gray", [], None)["removed"] is False


def test_the_active_slot_cannot_be_registered_or_removed(proxy, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green", version="7")
    for urls in ([], [b.url]):
        with pytest.raises(proxy_mod.ProxyAdminError) as refused:
            proxy_mod.register(proxy.port, proxy.token, "green", urls, "7")
        assert refused.value.status == 409
        assert proxy.admin("register", {"slot": "green", "upstreams": urls}).json()["error"] == (
            "slot_active")
    assert proxy.state()["slots"]["green"]["upstreams"][0]["url"] == a.url


def test_more_slots_than_the_limit_are_refused(proxy, upstream) -> None:
    a = upstream("a")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green")
    for index in range(proxy_mod.MAX_SLOTS - 1):
        proxy_mod.register(proxy.port, proxy.token, f"s{index}", [a.url], None)
    refused = proxy.admin("register", {"slot": "one-too-many", "upstreams": [a.url]})
    assert refused.status_code == 409 and refused.json()["error"] == "too_many_slots"
    assert len(proxy.state()["slots"]) == proxy_mod.MAX_SLOTS


BAD_REGISTRATIONS = {
    "version with a space": {"slot": "blue", "version": "v 7", "upstreams": []},
    "version not a string": {"slot": "blue", "version": 7, "upstreams": []},
    "upstreams a string": {"slot": "blue", "upstreams": "http://127.0.0.1:3000"},
    "upstreams missing": {"slot": "blue"},
    "remote upstream": {"slot": "blue", "upstreams": ["http://10.0.0.1:3000"]},
    "duplicate upstream": {"slot": "blue",
                           "upstreams": ["http://127.0.0.1:3000", "http://127.0.0.1:3000/"]},
    "too many upstreams": {"slot": "blue", "upstreams": [
        f"http://127.0.0.1:{3000 + i}" for i in range(proxy_mod.MAX_UPSTREAMS + 1)]},
    "unknown field": {"slot": "blue", "upstreams": [], "verify": False},
    "bad slot name": {"slot": "Blue!", "upstreams": []},
    "not an object": ["blue"],
}


def test_invalid_registrations_are_refused(proxy, upstream) -> None:
    a = upstream("a")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green")
    before = proxy.state()
    for case, body in BAD_REGISTRATIONS.items():
        refused = proxy.admin("register", body)
        assert refused.status_code == 400, case
        assert "invalid register request" in refused.json()["message"], case
    for token in ("", "x" * 43):
        assert proxy.admin("register", {"slot": "blue", "upstreams": []},
                           token=token).status_code == 401
    oversized = proxy.admin("register", {"slot": "blue", "upstreams": [], "pad": "x" * 5000})
    assert oversized.status_code == 413
    assert httpx.get(f"{proxy.url}/__proxy/register", trust_env=False).status_code == 405
    assert httpx.post(f"{proxy.url}/__proxy/metrics", trust_env=False).status_code == 405
    after = proxy.state()
    assert (after["slots"], after["generation"]) == (before["slots"], before["generation"])


BAD_SWITCHES = {
    "upstream and upstreams": {"slot": "blue", "upstream": "http://127.0.0.1:3000",
                               "upstreams": ["http://127.0.0.1:3000"]},
    "no upstream": {"slot": "blue", "upstreams": []},
    "verify not a boolean": {"slot": "blue", "upstreams": ["http://127.0.0.1:3000"],
                             "verify": "yes"},
    "unknown field": {"slot": "blue", "upstreams": ["http://127.0.0.1:3000"], "weight": 2},
}


def test_invalid_switches_are_refused(proxy, upstream) -> None:
    a = upstream("a")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green")
    generation = proxy.state()["generation"]
    for case, body in BAD_SWITCHES.items():
        refused = proxy.admin("switch", body)
        assert refused.status_code == 400, case
        assert "invalid switch request" in refused.json()["message"], case
    assert proxy.state()["generation"] == generation


def test_a_switch_needs_one_ready_upstream(proxy, upstream) -> None:
    a, unready = upstream("a"), upstream("unready", ready=False)
    absent = f"http://127.0.0.1:{free_port()}"
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green")
    with pytest.raises(proxy_mod.ProxyAdminError) as refused:
        proxy_mod.switch(proxy.port, proxy.token, [unready.url, absent], "blue", version="8")
    assert refused.value.status == 409
    assert "answered 503" in str(refused.value) and absent in str(refused.value)
    assert proxy.state()["active"] == "green" and "blue" not in proxy.state()["slots"]

    # One ready upstream is enough; the others start unhealthy and get no request.
    answer = proxy_mod.switch(proxy.port, proxy.token, [absent, unready.url, a.url], "blue")
    assert set(answer["not_ready"]) == {absent, unready.url}
    assert proxy.upstream_health("blue") == {absent: False, unready.url: False, a.url: True}
    assert {proxy.predict().json()["name"] for _ in range(6)} == {"a"}


# --------------------------------------------------------------------------------------------
# Metrics and bake statistics
# --------------------------------------------------------------------------------------------


def test_metrics_count_what_happened(proxy, upstream) -> None:
    a, b, c = upstream("a"), upstream("b"), upstream("c")
    proxy_mod.switch(proxy.port, proxy.token, [a.url, b.url], "green", version="7")
    proxy_mod.register(proxy.port, proxy.token, "blue", [c.url], "6")
    assert [proxy.predict().status_code for _ in range(6)] == [200] * 6
    assert proxy.predict(status=500).status_code == 500  # the upstream's own error counts too

    samples = proxy.metrics()
    assert metric(samples, "airmlops_proxy_requests_total", slot="green", code_class="2xx") == 6
    assert metric(samples, "airmlops_proxy_requests_total", slot="green", code_class="5xx") == 1
    assert metric(samples, "airmlops_proxy_requests_total", slot="blue", code_class="2xx") == 0
    for name, value in (("switches", 1), ("retries", 0), ("failovers", 0), ("unavailable", 0),
                        ("upstream_errors", 0)):
        assert metric(samples, f"airmlops_proxy_{name}_total") == value, name
    for slot, url in (("green", a.url), ("green", b.url), ("blue", c.url)):
        assert metric(samples, "airmlops_proxy_upstream_healthy", slot=slot, upstream=url) == 1
    histogram = "airmlops_proxy_request_duration_seconds"
    assert metric(samples, f"{histogram}_count", slot="green") == 7
    assert metric(samples, f"{histogram}_bucket", slot="green", le="+Inf") == 7
    assert metric(samples, f"{histogram}_bucket", slot="green", le="5.0") == 7
    assert metric(samples, f"{histogram}_count", slot="blue") == 0

    c.kill()
    wait_until(lambda: metric(proxy.metrics(), "airmlops_proxy_upstream_healthy", slot="blue",
                              upstream=c.url) == 0, "the gauge to show c down")


def test_bake_window_between_two_snapshots(proxy, upstream) -> None:
    a = upstream("a")
    proxy_mod.switch(proxy.port, proxy.token, a.url, "green", version="7")
    proxy.predict()  # before the window: not counted in it
    before = proxy_mod.slot_stats(proxy.port, "green")
    for _ in range(18):
        assert proxy.predict(sleep_ms=30).status_code == 200
    for _ in range(2):
        assert proxy.predict(status=503).status_code == 503
    after = proxy_mod.slot_stats(proxy.port, "green")

    window = proxy_mod.bake_window(before, after)
    assert (window["requests"], window["errors"]) == (20, 2)
    assert window["error_rate"] == pytest.approx(0.1)
    assert 50.0 <= window["p99_ms"] < math.inf  # the slowest answers took at least 30 ms

    quiet = proxy_mod.bake_window(after, proxy_mod.slot_stats(proxy.port, "green"))
    assert quiet == {"requests": 0, "errors": 0, "error_rate": 0.0, "p99_ms": None}
    with pytest.raises(ValueError, match="backwards"):
        proxy_mod.bake_window(after, before)
    with pytest.raises(proxy_mod.ProxyAdminError) as unknown:
        proxy_mod.slot_stats(proxy.port, "gray")
    assert unknown.value.status == 404


def snapshot(boot: str = "b1", **counts: int) -> dict[str, Any]:
    """A slot_stats snapshot with ``counts`` answers per bucket bound (``inf``: overflow)."""
    bounds = list(proxy_mod.LATENCY_BUCKETS_MS)
    latency = [counts.get(f"le{bound}", 0) for bound in bounds] + [counts.get("inf", 0)]
    return {"proxy_boot": boot, "requests": sum(latency), "errors": counts.get("errors", 0),
            "latency_buckets_ms": bounds, "latency_counts": latency, "latency_sum_ms": 0.0}


def test_bake_window_reads_the_bucket_of_the_99th_percentile() -> None:
    empty = snapshot()
    assert proxy_mod.bake_window(empty, snapshot(le5=99, le200=1))["p99_ms"] == 5.0
    assert proxy_mod.bake_window(empty, snapshot(le5=98, le200=2))["p99_ms"] == 200.0
    assert proxy_mod.bake_window(empty, snapshot(le5=50, inf=50))["p99_ms"] == math.inf
    window = proxy_mod.bake_window(snapshot(le1=10), snapshot(le1=10, le2=4, errors=1))
    assert window == {"requests": 4, "errors": 1, "error_rate": 0.25, "p99_ms": 2.0}
    with pytest.raises(ValueError, match="different proxy processes"):
        proxy_mod.bake_window(snapshot("b1"), snapshot("b2"))
    with pytest.raises(ValueError, match="not a slot_stats snapshot"):
        proxy_mod.bake_window({}, snapshot())


# --------------------------------------------------------------------------------------------
# Persistence and the command line
# --------------------------------------------------------------------------------------------


def test_the_table_survives_a_restart(proxy, upstream) -> None:
    a, b, c = upstream("a"), upstream("b"), upstream("c")
    proxy_mod.switch(proxy.port, proxy.token, [a.url, b.url], "green", version="7")
    proxy_mod.register(proxy.port, proxy.token, "blue", [c.url], "6")
    slots = proxy.state()["slots"]
    proxy.stop()
    proxy.start()
    state = proxy.state()
    assert (state["active"], state["version"], state["slots"]) == ("green", "7", slots)
    assert {proxy.predict().json()["name"] for _ in range(4)} == {"a", "b"}


def test_the_old_persisted_format_is_read(proxy_factory, upstream, tmp_path) -> None:
    a = upstream("a")
    state_dir = tmp_path / "old-format"
    state_dir.mkdir()
    (state_dir / proxy_mod.STATE_FILE).write_text(json.dumps({"url": a.url, "slot": "blue"}))
    proxy = proxy_factory(state_dir=state_dir)
    state = proxy.state()
    assert (state["active"], state["version"], state["upstream"]) == ("blue", None, a.url)
    assert proxy.predict().json()["name"] == "a"


def test_an_unreadable_persisted_table_starts_empty(proxy_factory, tmp_path) -> None:
    state_dir = tmp_path / "broken"
    state_dir.mkdir()
    (state_dir / proxy_mod.STATE_FILE).write_text('{"active": "green", "slots": {}}')
    proxy = proxy_factory(state_dir=state_dir)
    assert proxy.state()["slots"] == {} and not proxy_mod.healthz(proxy.port)
    assert "ignoring the persisted routing table" in proxy.log()


def test_the_command_line_sets_the_active_slot(proxy_factory, upstream) -> None:
    a, b = upstream("a"), upstream("b")
    proxy = proxy_factory("--upstream", a.url, "--upstream", b.url, "--slot", "green",
                          "--version", "7")
    state = proxy.state()
    assert (state["active"], state["version"]) == ("green", "7")
    assert [u["url"] for u in state["slots"]["green"]["upstreams"]] == [a.url, b.url]
    assert proxy_mod.healthz(proxy.port)


@pytest.mark.parametrize("argv", [
    ["--slot", "green"],
    ["--upstream", "http://10.0.0.1:3000"],
    ["--upstream", "http://127.0.0.1:3000", "--version", "v 7"],
    ["--health-interval", "0"],
], ids=["slot without upstream", "remote upstream", "bad version", "zero health interval"])
def test_invalid_command_lines_are_refused(tmp_path, argv) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "airmlops.serving.proxy", "--port", str(free_port()),
         "--state-dir", str(tmp_path), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("proxy: ")
