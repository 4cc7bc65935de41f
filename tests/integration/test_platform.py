"""The embedded platform under concurrent REST triggers, and its command line.

One platform for the module: a trivial DAG in a temporary dags folder, DAGs paused at creation
so triggered runs queue but never execute. The tests run in file order; the last one stops the
platform through the CLI (`down`), which is what `make stop` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from airmlops.platform import (
    AIRFLOW_COMPONENTS,
    API_SERVER,
    DAG_PROCESSOR,
    SCHEDULER,
    TRIGGERER,
    airflow_health,
    api_token,
    component_status,
    is_alive,
    pidfile,
    read_record,
    trigger_dag,
    wait_for_dag,
)

pytestmark = pytest.mark.integration

DAG_ID = "platform_probe"
TRIGGERS = 20
WATCHED = (API_SERVER, SCHEDULER, DAG_PROCESSOR, TRIGGERER)
PROBE_DAG = f'''
import datetime as dt

from airflow.sdk import dag, task


@dag(dag_id="{DAG_ID}", schedule=None, catchup=False, tags=["test"],
     start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))
def probe():
    @task
    def noop() -> None:
        return None

    noop()


probe()
'''


@pytest.fixture(scope="module")
def paused_platform(platform_factory, tmp_path_factory):
    dags = tmp_path_factory.mktemp("probe-dags")
    (dags / "probe.py").write_text(PROBE_DAG)
    return platform_factory("paused", dags, dags_paused_at_creation=True)


@pytest.fixture(scope="module")
def token(paused_platform) -> str:
    token = api_token(paused_platform.base_url, paused_platform.username, paused_platform.password)
    dag = wait_for_dag(paused_platform.base_url, token, DAG_ID, timeout=180.0)
    assert dag["is_paused"] is True, "DAGs must start paused on this platform"
    return token


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airmlops.platform", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env or dict(os.environ),
    )


def test_twenty_concurrent_triggers_all_succeed_and_nothing_dies(paused_platform, token):
    base_url = paused_platform.base_url
    pids_before = {n: read_record(paused_platform.run_dir, n) for n in AIRFLOW_COMPONENTS}
    barrier = threading.Barrier(TRIGGERS)

    def trigger(i: int) -> httpx.Response:
        body = {"logical_date": None, "dag_run_id": f"concurrent_{i:02d}", "conf": {"i": i}}
        with httpx.Client(trust_env=False, timeout=60) as client:
            barrier.wait()  # all POSTs leave together
            return client.post(
                f"{base_url}/api/v2/dags/{DAG_ID}/dagRuns",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=TRIGGERS) as pool:
        responses = list(pool.map(trigger, range(TRIGGERS)))
    took = time.monotonic() - started
    print(f"[integration] {TRIGGERS} concurrent triggers answered in {took:.2f} s")

    assert [r.status_code for r in responses] == [200] * TRIGGERS, [r.text for r in responses]
    runs = [r.json() for r in responses]
    assert sorted(r["dag_run_id"] for r in runs) == [f"concurrent_{i:02d}" for i in range(TRIGGERS)]
    assert all(r["state"] == "queued" for r in runs)
    with httpx.Client(trust_env=False, headers={"Authorization": f"Bearer {token}"}) as client:
        listing = client.get(f"{base_url}/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100})
    assert listing.status_code == 200
    assert listing.json()["total_entries"] == TRIGGERS
    assert {r["conf"]["i"] for r in listing.json()["dag_runs"]} == set(range(TRIGGERS))

    # Let the scheduler, DAG processor and triggerer go through several loops with the queue.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = component_status(paused_platform.run_dir)
        dead = [n for n in WATCHED if not status[n]["alive"]]
        assert not dead, f"died under concurrent triggers: {dead}"
        time.sleep(1)
    assert airflow_health(base_url) == {
        "metadatabase": "healthy",
        "scheduler": "healthy",
        "triggerer": "healthy",
        "dag_processor": "healthy",
    }
    assert {n: read_record(paused_platform.run_dir, n) for n in AIRFLOW_COMPONENTS} == pids_before


def test_duplicate_run_id_is_refused(paused_platform, token):
    from airmlops.platform import PlatformError

    trigger_dag(paused_platform.base_url, token, DAG_ID, run_id="once")
    with pytest.raises(PlatformError, match="409"):
        trigger_dag(paused_platform.base_url, token, DAG_ID, run_id="once")


def test_every_listening_socket_is_loopback(paused_platform):
    listening = []
    for name in AIRFLOW_COMPONENTS:
        leader = read_record(paused_platform.run_dir, name).pid
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) != leader:
                    continue
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
            listening += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == "LISTEN"]
    ports = {port for _, _, port in listening}
    config = paused_platform.config
    assert {config.airflow_port, config.log_server_port} <= ports
    assert all(ip == "127.0.0.1" for _, ip, _ in listening), listening


def test_the_watchdog_restarts_a_killed_scheduler_and_stops_what_it_left(paused_platform):
    import signal

    from airmlops.platform.supervise import _load_orphans

    run_dir: Path = paused_platform.run_dir
    killed = read_record(run_dir, SCHEDULER)
    leftovers = psutil.Process(killed.pid).children(recursive=True)
    assert leftovers, "the scheduler has no executor workers to leave behind"
    os.kill(killed.pid, signal.SIGKILL)

    def restarted() -> bool:
        record = read_record(run_dir, SCHEDULER)
        return record is not None and record.pid != killed.pid and is_alive(record)

    deadline = time.monotonic() + 60
    while not restarted():
        assert time.monotonic() < deadline, "the watchdog did not restart the scheduler"
        time.sleep(0.5)
    deadline = time.monotonic() + 60  # its idle executor workers are stopped next
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in leftovers):
        assert time.monotonic() < deadline, [p.cmdline() for p in leftovers if p.is_running()]
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while _load_orphans(run_dir):
        assert time.monotonic() < deadline, _load_orphans(run_dir)
        time.sleep(0.5)
    health = httpx.get(f"{paused_platform.base_url}/api/v2/monitor/health", timeout=10).json()
    deadline = time.monotonic() + 120
    while health["scheduler"]["status"] != "healthy":
        assert time.monotonic() < deadline, health
        time.sleep(2)
        health = httpx.get(f"{paused_platform.base_url}/api/v2/monitor/health",
                           timeout=10).json()


def test_sessions_idle_in_a_transaction_are_ended_by_the_database(paused_platform):
    from airmlops.embedded_pg import running_postgres

    handle = running_postgres(paused_platform.run_dir)
    assert handle is not None
    conn = handle.connect("airflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW idle_in_transaction_session_timeout")
            assert cur.fetchone()[0] == "1min"
    finally:
        conn.close()


def test_up_again_reuses_every_component(paused_platform):
    before = component_status(paused_platform.run_dir)
    result = _cli("up", "--run-dir", str(paused_platform.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all reused" in result.stdout
    assert component_status(paused_platform.run_dir) == before
    assert paused_platform.password in result.stdout  # the login is printed


def test_status_and_down_through_the_cli(paused_platform):
    run_dir: Path = paused_platform.run_dir
    status = _cli("status", "--run-dir", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert all(c["alive"] for c in report["components"].values()), report
    assert report["airflow_url"] == paused_platform.base_url
    assert set(report["airflow_health"].values()) == {"healthy"}

    groups = {read_record(run_dir, n).pid for n in AIRFLOW_COMPONENTS}
    postmaster = report["components"]["postgres"]["pid"]
    env = {**os.environ, "MLOPS_RUN_DIR": str(run_dir)}  # the run dir from the environment
    started = time.monotonic()
    down = _cli("down", env=env)
    print(f"[integration] down took {time.monotonic() - started:.1f} s:\n{down.stdout}")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout

    after = json.loads(_cli("status", "--json", env=env).stdout)
    assert not any(c["alive"] for c in after["components"].values()), after
    assert after["airflow_health"] is None
    assert not any(pidfile(run_dir, n).exists() for n in AIRFLOW_COMPONENTS)
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or a zombie until init reaps it
        assert psutil.Process(postmaster).status() == psutil.STATUS_ZOMBIE
    leftovers = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) in groups and proc.info["status"] != psutil.STATUS_ZOMBIE:
                leftovers.append(proc.pid)
        except ProcessLookupError:
            continue
    assert not leftovers, f"processes left in the platform's process groups: {leftovers}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{paused_platform.base_url}/api/v2/monitor/health", timeout=2, trust_env=False)

    again = _cli("down", env=env)  # idempotent
    assert again.returncode == 0
    assert "nothing was running" in again.stdout
