"""Shadow mirroring through the stable address, on real processes and real sockets.

The proxy is the real process (``python -m airmlops.serving.proxy``); the upstreams are small
HTTP servers in this test process, on their own loopback ports: ``/readyz`` answers 200, and
``/predict`` answers ``{"name", "x"}`` with an ``X-Request-ID`` derived from the body (so the
same request gets the same answer, byte for byte), after recording the request's headers and
body. A body may ask for a ``status``, or for no or an invalid request id. An upstream's gate
can be closed: its /predict requests then wait (a slow or stuck shadow) until it is opened.
Waits poll against deadlines; no sleep or timing decides an outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_process import WAIT, ProxyProcess, started_proxies, wait_until

from airmlops.platform import free_port
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.proxy.app import ReverseProxy
from airmlops.serving.proxy.shadow import selected
from airmlops.serving.proxy.table import RoutingTable, ShadowSpec, SlotSpec
from airmlops.serving.shadow_header import SHADOW_HEADER

pytestmark = pytest.mark.integration

SHADOW = SHADOW_HEADER.lower()


def request_id(body: bytes) -> str:
    """The request id an upstream gives the request of ``body`` (32 lowercase hex digits)."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class Seen:
    """One /predict request an upstream received: its headers (lowercased names) and body."""

    def __init__(self, headers: dict[str, str], body: bytes) -> None:
        self.headers, self.body = headers, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # /readyz
        self._reply(200, b'{"ready": true}', None)

    def do_POST(self) -> None:
        upstream: Upstream = self.server.upstream  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        upstream.record(Seen({k.lower(): v for k, v in self.headers.items()}, body))
        upstream.gate.wait(WAIT)
        request = json.loads(body)
        ask = request.get("id")
        rid = None if ask == "none" else "NOT-A-HEX-ID" if ask == "bad" else request_id(body)
        payload = json.dumps({"name": upstream.name, "x": request.get("x")}).encode()
        self._reply(request.get("status", 200), payload, rid)
        upstream.count_answer()

    do_PUT = do_POST

    def _reply(self, status: int, payload: bytes, rid: str | None) -> None:
        self.send_response_only(status)  # no Date, no Server: the same answer, byte for byte
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if rid is not None:
            self.send_header("X-Request-ID", rid)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


class Upstream:
    """A model-service stand-in on its own loopback port, recording what it receives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.answered = 0
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
        self.server.daemon_threads = True
        self.server.upstream = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def count_answer(self) -> None:
        with self._lock:
            self.answered += 1

    def shadow_of(self) -> list[str]:
        """The ``X-Airmlops-Shadow-Of`` of every request received, in order."""
        with self._lock:
            return [seen.headers.get(SHADOW, "") for seen in self.seen]

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


class Proxy(ProxyProcess):
    """The real proxy process, with a read timeout above any test's length."""

    def argv(self, *extra: str) -> list[str]:
        return super().argv("--read-timeout", "30", *extra)

    def shadow(self, body: Any, token: str | None = None) -> httpx.Response:
        """POST ``body`` to ``/__proxy/shadow`` (``token=""`` sends no Authorization)."""
        return self.admin("shadow", body, token)

    def deploy(self, live: Upstream, shadow: Upstream | str) -> None:
        """Slot ``live`` active (version 1), slot ``shadow`` registered (version 2)."""
        proxy_mod.switch(self.port, self.token, live.url, "live", version="1")
        url = shadow if isinstance(shadow, str) else shadow.url
        proxy_mod.register(self.port, self.token, "shadow", [url], "2")


@pytest.fixture
def upstream() -> Iterator[Callable[[str], Upstream]]:
    """Start upstreams by name; all are stopped afterwards."""
    started: list[Upstream] = []

    def start(name: str) -> Upstream:
        started.append(Upstream(name))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start proxies (each with its own state directory unless given one); all are stopped."""
    yield from started_proxies(Proxy, tmp_path)


def predict_all(proxy: Proxy, bodies: list[dict[str, Any]],
                headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """POST each body to the proxy's /predict in turn, on one keep-alive connection."""
    with httpx.Client(timeout=WAIT, trust_env=False) as client:
        return [client.post(f"{proxy.url}/predict", content=json.dumps(body).encode(),
                            headers={"Content-Type": "application/json", **(headers or {})})
                for body in bodies]


def exact(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An answer as the client got it, byte for byte."""
    return response.status_code, list(response.headers.raw), response.content


def encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def test_copies_carry_the_live_request_id_and_the_live_answers_are_unchanged(
        proxy_factory, upstream) -> None:
    proxy, live, shadow = proxy_factory(), upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    bodies = [{"x": index} for index in range(20)]
    before = [exact(r) for r in predict_all(proxy, bodies)]
    assert shadow.seen == []

    answer = proxy_mod.set_shadow(proxy.port, proxy.token, "shadow")
    assert answer["shadow"] == {"slot": "shadow", "percent": 100}
    stats_before = proxy_mod.slot_stats(proxy.port, "shadow")
    answers = predict_all(proxy, bodies, {"X-Client-Tag": "kept"})
    assert [exact(r) for r in answers] == before
    assert all(r.headers["x-upstream-slot"] == "live" for r in answers)

    wait_until(lambda: shadow.answered == len(bodies), "the shadow to answer every copy")
    ids = [r.headers["x-request-id"] for r in answers]
    assert sorted(shadow.shadow_of()) == sorted(ids)
    by_id = {seen.headers[SHADOW]: seen for seen in shadow.seen}
    for body, rid in zip(bodies, ids, strict=True):
        assert by_id[rid].body == encoded(body)
        assert by_id[rid].headers["x-client-tag"] == "kept"
    assert all(SHADOW not in seen.headers for seen in live.seen)

    state = wait_until(lambda: (s := proxy.state())["shadow_mirrored"] == 20 and s,
                       "the copies to be counted")
    assert (state["shadow"], state["shadow_routing"]) == ({"slot": "shadow", "percent": 100},
                                                          True)
    assert (state["shadow_dropped"], state["shadow_shed"], state["shadow_errors"]) == (0, 0, 0)
    assert state["shadow_budget_per_s"] is None  # live answers never slowed: no budget
    window = proxy_mod.step_window(stats_before, proxy_mod.slot_stats(proxy.port, "shadow"))
    assert (window["requests"], window["errors"]) == (20, 0)
    assert window["p50_ms"] is not None
    metrics = httpx.get(f"{proxy.url}/__proxy/metrics", trust_env=False).text
    for line in ("airmlops_proxy_shadow_mirrored_total 20",
                 "airmlops_proxy_shadow_dropped_total 0", "airmlops_proxy_shadow_shed_total 0",
                 "airmlops_proxy_shadow_errors_total 0"):
        assert line in metrics.splitlines()


def test_a_stuck_shadow_neither_delays_nor_fails_live_answers(proxy_factory, upstream) -> None:
    proxy, live, shadow = proxy_factory(), upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow")
    shadow.gate.clear()  # every copy waits until the test opens the gate

    answers = predict_all(proxy, [{"x": index} for index in range(30)])
    assert [(r.status_code, r.json()) for r in answers] == [
        (200, {"name": "live", "x": index}) for index in range(30)]
    assert shadow.answered == 0  # all 30 live answers came while the shadow answered none
    assert len(shadow.seen) <= 2  # one copy in flight per worker, the rest queued

    shadow.gate.set()
    wait_until(lambda: shadow.answered == 30, "the queued copies to be sent")
    assert proxy.state()["shadow_dropped"] == 0


def test_a_dead_shadow_neither_fails_live_answers_nor_keeps_being_tried(proxy_factory,
                                                                         upstream) -> None:
    proxy, live = proxy_factory(), upstream("live")
    proxy.deploy(live, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow")

    answers = predict_all(proxy, [{"x": index} for index in range(10)])
    assert [(r.status_code, r.json()["name"]) for r in answers] == [(200, "live")] * 10
    state = wait_until(lambda: not (s := proxy.state())["shadow_routing"] and s,
                       "the dead shadow to be marked down")
    assert state["shadow_errors"] == state["shadow_mirrored"]
    assert state["shadow"] == {"slot": "shadow", "percent": 100}  # still set, mirroring nothing
    assert proxy_mod.slot_stats(proxy.port, "shadow")["errors"] == state["shadow_errors"]
    assert [(r.status_code, r.json()["name"])
            for r in predict_all(proxy, [{"x": 1}] * 5)] == [(200, "live")] * 5


def test_a_full_queue_drops_copies_and_counts_them(proxy_factory, upstream) -> None:
    queue_size, workers = 4, 2
    proxy = proxy_factory("--shadow-queue-size", str(queue_size),
                          "--shadow-workers", str(workers))
    live, shadow = upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow")
    shadow.gate.clear()

    first = predict_all(proxy, [{"x": index} for index in range(workers)])
    wait_until(lambda: len(shadow.seen) == workers, "every worker to hold a copy")
    rest = predict_all(proxy, [{"x": index} for index in range(workers, 20)])
    assert [r.status_code for r in first + rest] == [200] * 20
    state = proxy.state()
    assert state["shadow_dropped"] == 20 - queue_size - workers
    assert state["shadow_mirrored"] == workers

    shadow.gate.set()
    wait_until(lambda: shadow.answered == queue_size + workers, "the queued copies to be sent")
    sent = [r.headers["x-request-id"] for r in (first + rest)[:queue_size + workers]]
    assert sorted(shadow.shadow_of()) == sorted(sent)  # the first ones, the later ones dropped
    assert wait_until(lambda: proxy.state()["shadow_mirrored"] == queue_size + workers,
                      "the copies to be counted")


def test_the_percent_selects_by_request_id(proxy_factory, upstream) -> None:
    proxy, live, shadow = proxy_factory(), upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow", 30)
    bodies = [{"x": index} for index in range(300)]

    answers = predict_all(proxy, bodies)
    ids = [r.headers["x-request-id"] for r in answers]
    expected = {rid for rid in ids if selected(rid, 30)}
    assert abs(len(expected) / len(ids) - 0.30) < 0.08
    wait_until(lambda: proxy.state()["shadow_mirrored"] == len(expected), "every copy sent")
    wait_until(lambda: shadow.answered == len(expected), "every copy answered")
    assert set(shadow.shadow_of()) == expected
    assert len(shadow.seen) == len(expected)


def test_only_200_answers_with_a_request_id_are_mirrored_and_no_client_forges_one(
        proxy_factory, upstream) -> None:
    proxy, live, shadow = proxy_factory(), upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow")
    forged = {SHADOW_HEADER: "f" * 32}

    refused = predict_all(proxy, [{"x": 1, "status": 500}, {"x": 2, "status": 404},
                                  {"x": 3, "status": 201}, {"x": 4, "id": "none"},
                                  {"x": 5, "id": "bad"}], forged)
    assert [r.status_code for r in refused] == [500, 404, 201, 200, 200]
    other = httpx.put(f"{proxy.url}/predict", json={"x": 6}, headers=forged, trust_env=False)
    assert other.status_code == 200
    (good,) = predict_all(proxy, [{"x": 7}], forged)
    rid = good.headers["x-request-id"]

    wait_until(lambda: rid in shadow.shadow_of(), "the one mirrorable request to be copied")
    assert proxy.state()["shadow_mirrored"] == 1  # nothing before it was queued
    assert shadow.shadow_of() == [rid]
    assert [seen.headers.get(SHADOW) for seen in live.seen] == [None] * 7


def test_the_shadow_survives_a_restart_and_ends_with_its_slot(proxy_factory,
                                                              upstream) -> None:
    proxy, live, shadow = proxy_factory(), upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow", 100)
    proxy.stop()
    proxy.start()

    assert proxy.state()["shadow"] == {"slot": "shadow", "percent": 100}
    (answer,) = predict_all(proxy, [{"x": 1}])
    wait_until(lambda: shadow.shadow_of() == [answer.headers["x-request-id"]],
               "the restarted proxy to mirror")

    proxy_mod.register(proxy.port, proxy.token, "shadow", [], "2")  # remove the slot
    state = proxy.state()
    assert (state["shadow"], state["shadow_routing"], "shadow" in state["slots"]) == (
        None, False, False)
    predict_all(proxy, [{"x": 2}])
    proxy.stop()
    proxy.start()
    assert proxy.state()["shadow"] is None
    assert len(shadow.seen) == 1


def test_switching_to_the_shadow_slot_ends_the_shadow(proxy_factory, upstream) -> None:
    proxy, live, shadow = proxy_factory(), upstream("live"), upstream("shadow")
    proxy.deploy(live, shadow)
    proxy_mod.set_shadow(proxy.port, proxy.token, "shadow")
    proxy_mod.switch(proxy.port, proxy.token, shadow.url, "shadow", version="2")
    state = proxy.state()
    assert (state["active"], state["shadow"]) == ("shadow", None)
    (answer,) = predict_all(proxy, [{"x": 1}])
    assert answer.json()["name"] == "shadow"
    assert shadow.shadow_of() == [""]  # served live, never as a copy


def test_the_mirror_starts_on_first_use_without_lifespan(tmp_path: Path, upstream) -> None:
    live, shadow = upstream("live"), upstream("shadow")
    table = RoutingTable({"live": SlotSpec("1", (live.url,)),
                          "shadow": SlotSpec("2", (shadow.url,))}, "live",
                         shadow=ShadowSpec("shadow"))
    app = ReverseProxy(tmp_path, table=table)

    async def drive() -> str:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            answer = await client.post("/predict", json={"x": 1})
        assert (answer.status_code, answer.json()) == (200, {"name": "live", "x": 1})
        deadline = time.monotonic() + WAIT
        while shadow.answered < 1:
            assert time.monotonic() < deadline, "the copy was never sent"
            await asyncio.sleep(0.02)
        return answer.headers["x-request-id"]

    rid = asyncio.run(drive())
    assert shadow.shadow_of() == [rid]
    assert app.counters["shadow_mirrored"] == 1
