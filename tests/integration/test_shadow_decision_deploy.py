"""Shadow deploys decided from the MLOps view, on real processes: the stable-address proxy,
BentoML model servers of the tiny versioned service (as in test_canary.py), and the view's app
whose decision route writes what the deploy reads.

Version 1 serves; version 2 is deployed with a shadow plan in a thread while the test waits
(polling the state file) for the shadow to run, then posts a decision through the app. A
decision mid-window promotes at once (whatever the rule says) or rejects with the live version
still serving; with manual promotion the deploy waits after its window, alerts once (to a
loopback webhook receiver), and promotes on a decision or rejects when none comes in time.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from proxy_process import WAIT, wait_until
from shadow_decision_app import AUTH, DECIDE, DecidingAuth, settings_for, view_client
from versioned_service_fixtures import FIXTURE, V1, V2

from airmlops.serving import cpu_class
from airmlops.serving import deploy as deploy_mod
from airmlops.serving.deploy import ShadowPlan, ShadowRejected, deploy, load_state, undeploy

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 4, 10, 12, 0, tzinfo=dt.UTC)
GOLDEN = [{"x": 1.0}, {"x": -2.5}]
LONG = 600.0
"""A window far longer than any test: only a decision ends it."""


def servers_of(tag: str, since: float = 0.0) -> list[psutil.Process]:
    """The worker processes of the model servers of the bento ``tag`` (what uses the CPU)
    started after ``since`` (an earlier test's may still be exiting)."""
    return [p for p in psutil.process_iter(["cmdline", "create_time"])
            if tag in (p.info["cmdline"] or []) and p.info["create_time"] >= since]


def no_pairs(start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
    """The versioned service keeps no prediction log: nothing to compare (the rule rejects)."""
    return {"pairs": 0}


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway BentoML store holding v1 and v2."""
    home = tmp_path_factory.mktemp("bentoml-home-shadow-decision")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run([sys.executable, str(FIXTURE / "build_bento.py"), "1:ok", "2:ok"],
                           env=env, cwd=str(home), capture_output=True, text=True, timeout=300,
                           check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.split() == [V1, V2]
    return home


class Receiver(http.server.ThreadingHTTPServer):
    """A loopback webhook that keeps every JSON payload posted to it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.payloads: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.payloads.append(json.loads(body))
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Rollout:
    """Version 1 serving pipeline ``churn`` under ``tmp_path``; :meth:`start` deploys version
    2 with a shadow plan in a thread, :meth:`decide` posts through the view's app."""

    def __init__(self, tmp_path: Path, bentoml_home: Path,
                 alerts: dict[str, Any] | None = None) -> None:
        self.settings = settings_for(tmp_path)
        self.root = self.settings.data_root
        self.common: dict[str, Any] = dict(
            root=self.root, proxy_port=deploy_mod.free_port(), ready_timeout=90.0,
            latency_budget_ms=2000.0, bentoml_home=bentoml_home, now=NOW, supervise=False,
            alerts=alerts)
        first = deploy("churn", "1", V1, "process", GOLDEN, **self.common)
        self.url = first.stable_url
        self.outcome: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self.started = 0.0

    def start(self, plan: ShadowPlan) -> None:
        self.started = time.time()
        def run() -> None:
            try:
                self.outcome["result"] = deploy("churn", "2", V2, "process", GOLDEN,
                                                shadow=plan, **self.common)
            except BaseException as exc:
                self.outcome["error"] = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def shadow(self) -> dict[str, Any]:
        return load_state("churn", self.root).get("shadow") or {}

    def wait_status(self, status: str) -> dict[str, Any]:
        """The shadow record once its status is ``status``."""
        return wait_until(lambda: self.shadow().get("status") == status and self.shadow(),
                          f"the shadow to be {status}", timeout=120)

    def decide(self, action: str, name: str = "alice") -> httpx.Response:
        with view_client(self.settings, DecidingAuth(name=name)) as client:
            return client.post(DECIDE, json={"version": 2, "action": action}, headers=AUTH)

    def finish(self) -> dict[str, Any]:
        """The deploy's outcome once it ended (far within the window: a decision ended it)."""
        assert self._thread is not None
        self._thread.join(timeout=WAIT * 6)
        assert not self._thread.is_alive(), "the deploy did not end"
        return self.outcome

    def serving(self) -> str:
        return httpx.post(f"{self.url}/predict", json={"x": 1.0}, timeout=10.0,
                          trust_env=False).json()["version"]

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.decide("reject")
            self._thread.join(timeout=WAIT * 3)
        undeploy("churn", self.root)


@pytest.fixture
def rollout(tmp_path: Path, bentoml_home: Path, receiver: Receiver) -> Iterator[Rollout]:
    one = Rollout(tmp_path, bentoml_home, {"webhook": {"url": receiver.url}})
    yield one
    one.close()


def test_a_promote_posted_mid_window_ends_it_and_promotes_whatever_the_rule_says(
        rollout: Rollout) -> None:
    rollout.start(ShadowPlan(LONG, no_pairs, min_requests=1))
    running = rollout.wait_status("running")
    assert (running["version"], running["promotion"]) == ("2", "rule")
    assert rollout.serving() == "1"
    shadow_servers = servers_of(V2, rollout.started)  # in the idle CPU class as the shadow
    assert shadow_servers and all(cpu_class.is_idle(p.pid) for p in shadow_servers)
    assert not any(cpu_class.is_idle(p.pid) for p in servers_of(V1))
    assert rollout.decide("promote").status_code == 202
    outcome = rollout.finish()
    assert "error" not in outcome, outcome.get("error")
    judgement = outcome["result"].shadow
    assert judgement["cpu_class"] == ["cgroup"]  # the project's machines: root, cgroup tree
    assert not any(cpu_class.is_idle(p.pid) for p in shadow_servers)  # out before it serves
    assert not cpu_class.shadow_groups()
    assert judgement["verdict"] == "promote" and judgement["decided_by"] == "alice"
    assert judgement["rule_verdict"] == "reject" and judgement["seconds"] < LONG
    record = rollout.shadow()
    assert (record["outcome"], record["decided_by"]) == ("promoted", "alice")
    assert record["decision"]["action"] == "promote" and "status" not in record
    assert rollout.serving() == "2"
    assert not (rollout.root / "deployments" / "churn" / "shadow-decision.json").exists()


def test_a_reject_posted_mid_window_rejects_and_the_live_version_keeps_serving(
        rollout: Rollout) -> None:
    rollout.start(ShadowPlan(LONG, no_pairs, min_requests=1))
    rollout.wait_status("running")
    shadow_servers = servers_of(V2, rollout.started)
    assert shadow_servers and all(cpu_class.is_idle(p.pid) for p in shadow_servers)
    assert rollout.decide("reject", name="bob").status_code == 202
    error = rollout.finish().get("error")
    assert isinstance(error, ShadowRejected)
    assert not cpu_class.shadow_groups()  # taken out, then stopped
    assert "rejected from the MLOps view by bob" in str(error)
    record = rollout.shadow()
    assert (record["outcome"], record["decided_by"]) == ("rejected", "bob")
    assert rollout.serving() == "1"
    assert load_state("churn", rollout.root)["slots"]["blue"]["model_version"] == "1"
    assert not (rollout.root / "deployments" / "churn" / "shadow-decision.json").exists()


def test_manual_promotion_waits_after_the_window_alerts_once_and_promotes_on_a_decision(
        rollout: Rollout, receiver: Receiver) -> None:
    rollout.start(ShadowPlan(0.5, no_pairs, min_requests=1, promotion="manual",
                             decision_timeout=LONG))
    awaiting = rollout.wait_status("awaiting")
    assert awaiting["judgement"]["rule_verdict"] == "reject"
    wait_until(lambda: receiver.payloads, "the alert")
    assert [p["event"] for p in receiver.payloads] == ["shadow_awaiting_decision"]
    assert receiver.payloads[0]["details"]["version"] == "2"
    assert rollout.serving() == "1"
    assert rollout.decide("promote").status_code == 202
    outcome = rollout.finish()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].shadow["decided_by"] == "alice"
    assert rollout.shadow()["outcome"] == "promoted" and rollout.serving() == "2"
    assert len(receiver.payloads) == 1


def test_manual_promotion_without_a_decision_in_time_rejects_with_the_alert_sent(
        rollout: Rollout, receiver: Receiver) -> None:
    rollout.start(ShadowPlan(0.5, no_pairs, min_requests=1, promotion="manual",
                             decision_timeout=2.0))
    error = rollout.finish().get("error")
    assert isinstance(error, ShadowRejected)
    assert "no decision within 2 s" in str(error)
    assert [p["event"] for p in receiver.payloads] == ["shadow_awaiting_decision"]
    record = rollout.shadow()
    assert (record["outcome"], record["decided_by"]) == ("rejected", "timeout")
    assert rollout.serving() == "1"
