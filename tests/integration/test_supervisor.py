"""The deployment supervisor and the per-server metrics folders, on real processes.

A tiny BentoML service (``fixtures/versioned_service``) is deployed with a hot spare and without the
background supervisor, so each test drives :class:`~airmlops.serving.deploy.supervisor.Supervisor`
itself, one look at a time, on a clock it controls: a dead server is restarted on its port, a
second death waits for the backoff, nothing is touched while an operation holds the lock, a dead
proxy comes back on its port, and an undeployed pipeline ends the supervision. Metrics: two
servers of one build count their own requests only, and a server that starts later erases
nobody's counters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from airmlops.processes import marked_processes, process_alive
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy import (
    INSTANCE_MARKER,
    deploy,
    deployment_dir,
    free_port,
    load_state,
    start_slot,
    stop_slot,
    undeploy,
    wait_ready,
)
from airmlops.serving.deploy.supervisor import BACKOFF_INITIAL, Supervisor

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "versioned_service"
V1 = "versioned_service:v1-ok"
PIPELINE = "supervised"
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run([sys.executable, str(FIXTURE / "build_bento.py"), "1:ok"], env=env,
                           cwd=str(home), capture_output=True, text=True, timeout=300,
                           check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    return home


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def deployed(tmp_path: Path, bentoml_home: Path) -> Iterator[Path]:
    deploy(PIPELINE, "1", V1, "process", [{"x": 1.0}], root=tmp_path,
           proxy_port=free_port(), ready_timeout=60, latency_budget_ms=2000, now=NOW,
           bentoml_home=bentoml_home, spares=1, supervise=False,
           env={"MLOPS_DATA_ROOT": str(tmp_path)})
    try:
        yield tmp_path
    finally:
        undeploy(PIPELINE, tmp_path)


def _kill_server(instance: dict) -> None:
    """SIGKILL a server's process manager and workers; wait until they are gone."""
    procs = {proc.pid: proc for proc in marked_processes(INSTANCE_MARKER, instance["instance"])}
    if process_alive(instance["pid"], instance["create_time"]):
        procs.setdefault(instance["pid"], psutil.Process(instance["pid"]))
    assert procs, f"no process of server {instance['instance']}"
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(procs.values()), timeout=10)
    assert not process_alive(instance["pid"], instance["create_time"])


def _live(root: Path) -> dict:
    state = load_state(PIPELINE, root)
    return state["slots"][state["active"]]


def test_a_dead_server_is_restarted_on_its_port_then_backs_off(deployed: Path) -> None:
    clock = Clock()
    supervisor = Supervisor(PIPELINE, deployed, clock=clock)
    try:
        assert supervisor.check() and supervisor.restarts == 0  # nothing died yet
        replica = _live(deployed)["replicas"][0]
        _kill_server(replica)
        assert supervisor.check()
        after = _live(deployed)["replicas"][0]
        assert after["port"] == replica["port"] and after["pid"] != replica["pid"]
        assert after["restarts"] == 1 and process_alive(after["pid"], after["create_time"])
        wait_ready(after["upstream"], 60)

        _kill_server(after)  # dies again at once: the next start waits for the backoff
        clock.now += BACKOFF_INITIAL / 2
        supervisor.check()
        assert _live(deployed)["replicas"][0]["pid"] == after["pid"]  # not yet
        clock.now += BACKOFF_INITIAL
        supervisor.check()
        again = _live(deployed)["replicas"][0]
        assert again["pid"] != after["pid"] and again["restarts"] == 2
        assert supervisor.backoff["blue/1"].delay == BACKOFF_INITIAL * 4  # doubled twice
        wait_ready(again["upstream"], 60)
    finally:
        supervisor.close()


def test_nothing_is_restarted_while_an_operation_holds_the_lock(deployed: Path) -> None:
    supervisor = Supervisor(PIPELINE, deployed, clock=Clock())
    primary = _live(deployed)
    _kill_server(primary)
    try:
        with open(deployment_dir(PIPELINE, deployed) / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            assert supervisor.check()
            fcntl.flock(lock, fcntl.LOCK_UN)
        assert _live(deployed)["pid"] == primary["pid"] and supervisor.restarts == 0
        assert supervisor.check() and _live(deployed)["pid"] != primary["pid"]
    finally:
        supervisor.close()


def test_a_dead_proxy_comes_back_on_its_port_with_its_routes(deployed: Path) -> None:
    supervisor = Supervisor(PIPELINE, deployed, clock=Clock())
    proxy = load_state(PIPELINE, deployed)["proxy"]
    os.kill(proxy["pid"], signal.SIGKILL)
    psutil.wait_procs([psutil.Process(proxy["pid"])], timeout=10)
    try:
        assert supervisor.check()
        restarted = load_state(PIPELINE, deployed)["proxy"]
        assert restarted["port"] == proxy["port"] and restarted["pid"] != proxy["pid"]
        assert proxy_mod.healthz(proxy["port"])
        routing = proxy_mod.get_state(proxy["port"])
        assert routing["active"] == "blue"
        assert len(routing["slots"]["blue"]["upstreams"]) == 2
        answer = httpx.post(f"{proxy['url']}/predict", json={"x": 2.0}, timeout=10)
        assert answer.status_code == 200 and answer.json()["version"] == "1"
    finally:
        supervisor.close()


def test_an_undeployed_pipeline_ends_the_supervision(deployed: Path) -> None:
    supervisor = Supervisor(PIPELINE, deployed, clock=Clock())
    undeploy(PIPELINE, deployed)
    assert supervisor.check() is False
    supervisor.close()


def test_each_server_counts_its_own_requests_and_a_new_one_erases_nothing(
        tmp_path: Path, bentoml_home: Path) -> None:
    started = []

    def start() -> str:
        handle = start_slot("process", V1, free_port(), {"MLOPS_DATA_ROOT": str(tmp_path)},
                            name=f"metrics-{len(started)}", log_dir=tmp_path / "logs",
                            bentoml_home=bentoml_home)
        started.append(handle)
        wait_ready(handle.upstream, 60)
        return handle.upstream

    def served(url: str) -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bentoml_service_request_total{")
                   and 'endpoint="/predict"' in line)

    try:
        first, second = start(), start()
        for _ in range(7):
            assert httpx.post(f"{first}/predict", json={"x": 1.0}, timeout=10).status_code == 200
        assert served(first) == 7 and served(second) == 0
        start()  # a later start (a deploy) used to empty the one shared folder
        assert served(first) == 7
    finally:
        for handle in started:
            stop_slot(handle, timeout=5)
