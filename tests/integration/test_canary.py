"""Canary deploys on real processes: the stable-address proxy and BentoML model servers.

The tiny versioned service of ``fixtures/versioned_service`` (as in test_deploy.py) is built
into a throwaway ``BENTOML_HOME``: v1 and v2 answer ``{"version": ...}``; v4 (mode
``live_fails``) passes the smoke test (requests without an entity) and answers 500 to every
request naming one, like a model broken on live traffic. A bounded load of requests for a
fixed set of entities runs against the stable address while a watcher polls the proxy's
canary weight, so each answer can be placed in a step.
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
from versioned_service_fixtures import FIXTURE, V1, V2

from airmlops.errors import BakeFailed
from airmlops.serving import deploy as deploy_mod
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy import (
    CanaryFailed,
    CanaryPlan,
    deploy,
    ensure_proxy,
    load_state,
    status,
    undeploy,
)
from airmlops.serving.deploy.canary import TrialTarget, run_canary
from airmlops.serving.proxy.canary import bucket

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
GOLDEN = [{"x": 1.0}, {"x": -2.5}, {"x": 0.0}]
LIVE_FAILS = "versioned_service:v4-live-fails"
ENTITIES = [f"customer-{index}" for index in range(240)]
PLAN = CanaryPlan((20, 100), 4.0, "entity", max_error_rate_increase=0.01,
                  max_latency_ratio=1.5, min_requests=20)


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway BentoML store holding v1, v2 and the build that fails on live traffic."""
    home = tmp_path_factory.mktemp("bentoml-home-canary")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run(
        [sys.executable, str(FIXTURE / "build_bento.py"), "1:ok", "2:ok", "4:live_fails"],
        env=env, cwd=str(home), capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.split() == [V1, V2, LIVE_FAILS]
    return home


def answers_version(expected: str):
    """A smoke validator: the answer names ``expected``."""
    return lambda request, body: body.get("version") == expected


class EntityLoad:
    """A few threads sending ``{"x", "entity"}`` for the entities in turn; records each answer
    as ``(started, ended, entity, status, version)``."""

    def __init__(self, url: str, *, threads: int = 4, pace: float = 0.02) -> None:
        self.url, self.pace = url, pace
        self.answers: list[tuple[float, float, str, int, str | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)

    def _run(self, index: int) -> None:
        turn = index * 61
        with httpx.Client(timeout=15.0, trust_env=False) as client:
            while not self._stop.is_set():
                entity = ENTITIES[turn % len(ENTITIES)]
                turn += 1
                started = time.monotonic()
                try:
                    response = client.post(f"{self.url}/predict",
                                           json={"x": 1.0, "entity": entity})
                    status = response.status_code
                    version = response.json().get("version") if status == 200 else None
                except httpx.HTTPError:
                    status, version = 0, None
                with self._lock:
                    self.answers.append((started, time.monotonic(), entity, status, version))
                time.sleep(self.pace)


class WeightWatcher:
    """Polls the proxy's canary every 50 ms: ``(time, weight or None)``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with_canary = proxy_mod.get_state(self.port).get("canary")
            self.seen.append((time.monotonic(), with_canary["weight"] if with_canary else None))
            time.sleep(0.05)

    def interval(self, weight: int) -> tuple[float, float]:
        """The first and last time ``weight`` was seen (strictly inside its true span)."""
        times = [moment for moment, seen in self.seen if seen == weight]
        assert times, f"the canary was never seen at {weight} %: {self.seen[-5:]}"
        return min(times), max(times)


def expected_version(entity: str, weight: int, new: str, old: str) -> str:
    """What the sticky split should answer ``entity`` at ``weight`` percent."""
    return new if bucket(entity) < weight * 100 else old


def test_a_good_version_walks_every_step_and_becomes_active(tmp_path: Path,
                                                            bentoml_home: Path) -> None:
    pipeline, port = "canary_good", deploy_mod.free_port()
    common: dict[str, Any] = dict(root=tmp_path, proxy_port=port, ready_timeout=60.0,
                                  latency_budget_ms=1000.0, bentoml_home=bentoml_home, now=NOW)
    try:
        first = deploy(pipeline, "1", V1, "process", GOLDEN, validate=answers_version("1"),
                       canary=PLAN, **common)
        assert first.canary is None  # nothing live to compare with: switched at once
        load, watcher = EntityLoad(first.stable_url), WeightWatcher(port)
        load.start()
        watcher.start()
        time.sleep(0.5)
        second = deploy(pipeline, "2", V2, "process", GOLDEN, validate=answers_version("2"),
                        canary=PLAN, **common)
        time.sleep(0.5)
        watcher.stop()
        load.stop()
        state = load_state(pipeline, tmp_path)
        report = status(pipeline, tmp_path)
    finally:
        undeploy(pipeline, tmp_path)

    steps = second.canary
    print(f"\n[canary] timings {second.timings}\n[canary] steps {json.dumps(steps)}")
    assert [s["percent"] for s in steps] == [20, 100]
    assert [s["verdict"] for s in steps] == ["pass", "pass"]
    assert second.slot == "green" and state["active"] == "green"
    assert state["slots"]["green"]["model_version"] == "2"
    assert state["canary"]["outcome"] == "promoted" and state["canary"]["steps"] == steps
    assert report["canary"] == state["canary"] and report["active_version"] == "2"
    assert [status for *_, status, _ in load.answers if status != 200] == []

    # The 20 % step, as the proxy counted it: near 20 % of the requests went to the canary.
    first_step = steps[0]
    assert first_step["live"]["window"] == "step"
    share = first_step["requests"] / (first_step["requests"] + first_step["live"]["requests"])
    assert 0.12 <= share <= 0.28, share

    # ... and as the clients saw it: each entity got the version its bucket names.
    start, end = watcher.interval(20)
    during = [(entity, version) for t0, t1, entity, _, version in load.answers
              if start + 0.1 < t0 and t1 < end - 0.1]
    wrong = [(e, v) for e, v in during if v != expected_version(e, 20, "2", "1")]
    canary_share = sum(v == "2" for _, v in during) / len(during)
    print(f"[canary] 20 % step: {len(during)} answers, canary share {canary_share:.3f} "
          f"(proxy counted {share:.3f})")
    assert len(during) >= 100 and wrong == []
    assert 0.12 <= canary_share <= 0.28
    assert len({e for e, _ in during}) > 100  # many entities, each sticky
    # Over the whole deploy no entity went back from the new version to the old one.
    for entity in ENTITIES:
        versions = [v for *_, e, _, v in load.answers if e == entity]
        if "2" in versions:
            assert "1" not in versions[versions.index("2"):], entity


def test_a_broken_version_rolls_back_at_the_first_step(tmp_path: Path,
                                                       bentoml_home: Path) -> None:
    pipeline, port = "canary_bad", deploy_mod.free_port()
    common: dict[str, Any] = dict(root=tmp_path, proxy_port=port, ready_timeout=60.0,
                                  latency_budget_ms=1000.0, bentoml_home=bentoml_home, now=NOW)
    try:
        first = deploy(pipeline, "1", V1, "process", GOLDEN, validate=answers_version("1"),
                       **common)
        before = load_state(pipeline, tmp_path)
        load, watcher = EntityLoad(first.stable_url), WeightWatcher(port)
        load.start()
        watcher.start()
        time.sleep(0.5)
        with pytest.raises(CanaryFailed) as failed:
            deploy(pipeline, "4", LIVE_FAILS, "process", GOLDEN,
                   validate=answers_version("4"), canary=PLAN, **common)
        rolled_back_at = time.monotonic()
        time.sleep(1.5)  # the live version keeps serving everyone
        watcher.stop()
        load.stop()
        after = load_state(pipeline, tmp_path)
        routing = proxy_mod.get_state(port)
        answer = httpx.post(f"{first.stable_url}/predict", json={"x": 2.0, "entity": "c1"},
                            timeout=10.0, trust_env=False)
    finally:
        undeploy(pipeline, tmp_path)

    error = failed.value
    print(f"\n[canary] failed: {error.reason[:300]}")
    assert isinstance(error, BakeFailed) and error.stage == "canary"
    assert [(s["percent"], s["verdict"]) for s in error.steps] == [(20, "fail")]
    assert error.steps[0]["errors"] == error.steps[0]["requests"] > 0
    assert "error rate" in error.steps[0]["reason"] and "step 20 %" in str(error)

    # The live version serves as before; the state only gained the canary's record.
    assert answer.status_code == 200 and answer.json()["version"] == "1"
    assert {k: v for k, v in after.items() if k != "canary"} == before
    assert after["canary"]["outcome"] == "rolled_back"
    assert after["canary"]["steps"] == error.steps
    assert routing["canary"] is None and set(routing["slots"]) == {"blue"}
    assert not any(LIVE_FAILS in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))

    # Only the canary's entities were affected, and only while it had them.
    start, end = watcher.interval(20)
    failures = [(t0, entity) for t0, _, entity, status, _ in load.answers if status != 200]
    assert failures, "the broken version answered no request"
    assert all(bucket(entity) < 2000 for _, entity in failures)
    assert all(t0 < end + 0.5 for t0, _ in failures)
    assert all(status == 200 for t0, _, _, status, _ in load.answers if t0 > rolled_back_at)
    during = [a for a in load.answers if start - 0.5 < a[0] < end + 0.5]
    share = len(failures) / len(during)
    print(f"[canary] {len(failures)} of {len(during)} requests failed during the step "
          f"({share:.3f})")
    assert share <= 0.3


# --------------------------------------------------------------------------------------------
# The split at the proxy, and a step with too little traffic
# --------------------------------------------------------------------------------------------


class _NamedHandler(BaseHTTPRequestHandler):
    """Answers every request with its server's name."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        payload = json.dumps({"name": self.server.name}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def named_server(name: str) -> Iterator[str]:
    """A small upstream answering ``{"name": name}``; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NamedHandler)
    server.daemon_threads = True
    server.name = name  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_proxy_splits_predict_requests_by_entity_only(tmp_path: Path) -> None:
    proxy = ensure_proxy("canarysplit", deploy_mod.free_port(), tmp_path)
    try:
        with named_server("stable") as stable, named_server("canary") as canary:
            proxy_mod.switch(proxy.port, proxy.token, stable, "blue", version="1")
            proxy_mod.register(proxy.port, proxy.token, "green", [canary], "2")
            proxy_mod.set_canary(proxy.port, proxy.token, "green", 100, "customer_id")
            with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10.0) as client:

                def served(method: str, path: str, body: bytes) -> str:
                    answer = client.request(method, path, content=body)
                    assert answer.status_code == 200, answer.text
                    return answer.json()["name"]

                many = b'{"instances": [{"customer_id": 7}, {"customer_id": 8}]}'
                assert served("POST", "/predict", many) == "canary"
                assert served("POST", "/predict", b'{"customer_id": "c1"}') == "canary"
                for unreadable in (b"not json", b"{}", b'{"instances": []}',
                                   b'{"customer_id": [1]}', b""):
                    assert served("POST", "/predict", unreadable) == "stable", unreadable
                assert served("POST", "/feedback", b'{"customer_id": "c1"}') == "stable"
                assert served("GET", "/predict", b"") == "stable"

                # At 30 %: an entity's answers all come from one slot, the one its bucket names.
                proxy_mod.set_canary(proxy.port, proxy.token, "green", 30, "customer_id")
                for index in range(60):
                    body = json.dumps({"instances": [{"customer_id": f"e{index}"}]}).encode()
                    names = {served("POST", "/predict", body) for _ in range(3)}
                    assert names == {"canary" if bucket(f"e{index}") < 3000 else "stable"}

                # Switching to the canary's slot ends the canary: all of it is served there.
                proxy_mod.switch(proxy.port, proxy.token, canary, "green", version="2")
                assert proxy_mod.get_state(proxy.port)["canary"] is None
                assert served("POST", "/predict", b"not json") == "canary"
    finally:
        undeploy("canarysplit", tmp_path)


def test_a_step_short_of_requests_is_held_once_more_then_fails_empty(tmp_path: Path) -> None:
    proxy = ensure_proxy("canaryquiet", deploy_mod.free_port(), tmp_path)
    try:
        with named_server("stable") as stable, named_server("canary") as canary:
            proxy_mod.switch(proxy.port, proxy.token, stable, "blue", version="1")
            proxy_mod.register(proxy.port, proxy.token, "green", [canary], "2")
            plan = CanaryPlan((50, 100), 0.3, "customer_id", min_requests=5)
            target = TrialTarget(proxy.port, proxy.token, "green", "blue")
            started = time.monotonic()
            with pytest.raises(CanaryFailed) as failed:
                run_canary(target, plan)  # no traffic at all
            took = time.monotonic() - started
    finally:
        undeploy("canaryquiet", tmp_path)
    (step,) = failed.value.steps
    assert (step["percent"], step["extended"], step["requests"]) == (50, True, 0)
    assert step["verdict"] == "fail" and "no request" in step["reason"]
    assert 0.6 <= took < 3.0  # held twice


def test_a_stable_address_lost_mid_canary_leaves_the_steps_it_took(tmp_path: Path) -> None:
    """The proxy is killed after the first step: run_canary raises (the address cannot be
    driven) and the caller's list holds the first step's judgement."""
    proxy = ensure_proxy("canarylost", deploy_mod.free_port(), tmp_path)
    steps: list[dict[str, Any]] = []

    def sleep_then_kill_after_a_step(seconds: float) -> None:
        time.sleep(seconds)
        if steps and psutil.pid_exists(proxy.pid):
            os.kill(proxy.pid, signal.SIGKILL)
            psutil.Process(proxy.pid).wait(timeout=10)

    try:
        with named_server("stable") as stable, named_server("canary") as canary:
            proxy_mod.switch(proxy.port, proxy.token, stable, "blue", version="1")
            proxy_mod.register(proxy.port, proxy.token, "green", [canary], "2")
            # The widest margins: on a loaded machine only the loss of the address may end
            # this canary, never a judgement of a few slow answers.
            plan = CanaryPlan((50, 100), 0.5, "customer_id", max_error_rate_increase=1.0,
                              max_latency_ratio=100.0, min_requests=1)
            target = TrialTarget(proxy.port, proxy.token, "green", "blue")
            stop = threading.Event()

            def load() -> None:
                with httpx.Client(base_url=proxy.url, trust_env=False, timeout=2.0) as client:
                    turn = 0
                    while not stop.is_set():
                        turn += 1
                        body = json.dumps({"customer_id": f"c{turn % 50}"}).encode()
                        with contextlib.suppress(httpx.HTTPError):
                            client.post("/predict", content=body)
                        time.sleep(0.01)

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            try:
                with pytest.raises(proxy_mod.ProxyAdminError):
                    run_canary(target, plan, sleep_then_kill_after_a_step, steps=steps)
            finally:
                stop.set()
                loader.join(timeout=10)
    finally:
        undeploy("canarylost", tmp_path)
    (step,) = steps
    assert step["percent"] == 50 and step["verdict"] == "pass" and step["requests"] > 0

