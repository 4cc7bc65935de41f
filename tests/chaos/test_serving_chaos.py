"""Faults injected into a live deployment under steady load (see conftest.py).

Each test kills something real with SIGKILL while :class:`LoadGenerator` calls the stable address,
then asserts what the issue promised: one worker costs no request; a whole model server costs
at most a second and is restarted by the supervisor, with an alert; the stable address itself is
back within two seconds; a Redis outage costs no acknowledged prediction, each logged exactly
once. The numbers go to benchmarks/results/chaos.md. The tests run in file order on one
deployment: each leaves it whole again (checked) for the next.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import httpx
import psutil
import pytest
from chaos_kit import FaultResult, LoadGenerator, failure_streak, wait_for

from airmlops.processes import marked_processes
from airmlops.serving.deploy import INSTANCE_MARKER

pytestmark = pytest.mark.integration


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _healthy_everywhere(deployment) -> bool:
    live = deployment.live()
    instances = [live, *live.get("replicas", ())]
    return all(_ready(one["upstream"]) for one in instances) and _proxy_healthy(deployment)


def _proxy_healthy(deployment) -> bool:
    from airmlops.serving import proxy

    return proxy.healthz(deployment.port, timeout=1.0)


def _workers(arbiter_pid: int) -> list[psutil.Process]:
    arbiter = psutil.Process(arbiter_pid)
    return [p for p in arbiter.children(recursive=True) if p.is_running()]


def _settle(load: LoadGenerator, seconds: float) -> None:
    time.sleep(seconds)
    assert load.answers, "the load generator sent nothing"


def test_kill_one_model_worker_fails_no_request(deployment, chaos_results) -> None:
    live = deployment.live()
    workers = _workers(live["pid"])
    assert len(workers) >= 2, f"expected two workers under {live['pid']}: {workers}"
    with LoadGenerator(deployment.url, deployment.entities) as load:
        _settle(load, 2.0)
        fault_at = time.monotonic()
        os.kill(workers[0].pid, signal.SIGKILL)
        wait_for(lambda: len(_workers(live["pid"])) >= len(workers), 60,
                 "the arbiter to restart its worker")
        _settle(load, 3.0)
    answers = load.since(fault_at)
    failed, streak, _first, recovered = failure_streak(answers)
    chaos_results.append(FaultResult("kill -9 one model worker", len(answers), failed, streak,
                                     (recovered - fault_at) if recovered else 0.0, "none",
                                     "not needed", "0 failed requests"))
    assert failed == 0, [a for a in answers if not a.ok][:5]


def test_kill_the_whole_live_server_recovers_within_a_second(deployment, chaos_results) -> None:
    live = deployment.live()
    with LoadGenerator(deployment.url, deployment.entities) as load:
        _settle(load, 2.0)
        fault_at = time.monotonic()
        doomed = marked_processes(INSTANCE_MARKER, live["instance"])
        assert doomed, "no process carries the live server's instance marker"
        for proc in doomed:
            os.kill(proc.pid, signal.SIGKILL)
        restarted = wait_for(lambda: deployment.live()["pid"] != live["pid"]
                             and _healthy_everywhere(deployment), 120,
                             "the supervisor to restart the server")
        assert restarted
        recovered_at = time.monotonic()
        _settle(load, 2.0)
    answers = load.since(fault_at)
    failed, streak, _first, _recovered = failure_streak(answers)
    alert = wait_for(lambda: deployment.alerts.events("slot_died"), 30, "the slot_died alert")
    chaos_results.append(FaultResult(
        "kill -9 the live model server (arbiter and workers)", len(answers), failed, streak,
        recovered_at - fault_at, "none", f"slot_died ({len(alert)})",
        "<= 1 s of failed requests, restarted, alert"))
    assert streak <= 1.0, f"{failed} failed over {streak:.2f} s"
    assert deployment.live()["restarts"] >= 1


def test_kill_the_stable_address_is_back_within_two_seconds(deployment, chaos_results) -> None:
    proxy = deployment.state()["proxy"]
    with LoadGenerator(deployment.url, deployment.entities) as load:
        _settle(load, 2.0)
        fault_at = time.monotonic()
        os.kill(proxy["pid"], signal.SIGKILL)
        wait_for(lambda: deployment.state()["proxy"]["pid"] != proxy["pid"]
                 and _proxy_healthy(deployment), 30, "the supervisor to restart the proxy")
        recovered_at = time.monotonic()
        _settle(load, 2.0)
    answers = load.since(fault_at)
    failed, streak, _first, _recovered = failure_streak(answers)
    alert = wait_for(lambda: deployment.alerts.events("proxy_died"), 30, "the proxy_died alert")
    chaos_results.append(FaultResult(
        "kill -9 the stable-address proxy", len(answers), failed, streak,
        recovered_at - fault_at, "none", f"proxy_died ({len(alert)})",
        "restarted, <= 2 s refused"))
    assert streak <= 2.0, f"{failed} failed over {streak:.2f} s"


def test_redis_down_for_30_seconds_loses_no_acknowledged_prediction(
        deployment, chaos_results) -> None:
    import redis

    from airmlops.serving.prediction_log import stream_keys

    with LoadGenerator(deployment.url, deployment.entities) as load:
        _settle(load, 2.0)
        fault_at = time.monotonic()
        deployment.redis.kill()
        time.sleep(30)
        deployment.redis.start()
        back_at = time.monotonic()
        _settle(load, 3.0)
    answers = load.since(fault_at)
    failed, streak, _first, _recovered = failure_streak(answers)
    acknowledged = [a.request_id for a in load.answers if a.ok]
    key = stream_keys(deployment.pipeline)[0]
    client = redis.Redis.from_url(deployment.redis.url, socket_timeout=5)

    def logged() -> Counter:
        counts: Counter = Counter()
        for _id, fields in client.xrange(key):
            counts[fields[b"request_id"].decode()] += 1
        return counts

    counts = wait_for(lambda: (c := logged()) and all(c[r] for r in acknowledged) and c, 120,
                      "every acknowledged prediction to reach Redis")
    replayed_at = time.monotonic()
    missing = [r for r in acknowledged if counts[r] == 0]
    twice = [r for r in acknowledged if counts[r] > 1]
    chaos_results.append(FaultResult(
        "Redis (prediction log) killed for 30 s", len(answers), failed, streak,
        replayed_at - back_at, f"{len(missing)} missing, {len(twice)} twice",
        "n/a (degraded /readyz)", "2xx throughout; each acknowledged prediction once"))
    assert failed == 0, [a for a in answers if not a.ok][:5]
    assert not missing and not twice


def test_kill_the_shadows_server_mid_window_fails_no_live_request(
        deployment, chaos_results) -> None:
    import threading
    from pathlib import Path

    from airmlops.serving import cpu_class
    from airmlops.serving.deploy import DeployError, ShadowPlan, deploy

    live_version = deployment.live()["model_version"]
    plan = ShadowPlan(8.0, lambda start, end: {"pairs": 0}, min_requests=1)
    outcome: dict[str, BaseException | object] = {}

    def shadow_deploy() -> None:
        try:
            outcome["result"] = deploy(deployment.pipeline, f"{live_version}0",
                                       shadow=plan, supervise=False, **deployment.deploy_args)
        except BaseException as exc:
            outcome["error"] = exc

    with LoadGenerator(deployment.url, deployment.entities) as load:
        _settle(load, 2.0)
        thread = threading.Thread(target=shadow_deploy, daemon=True)
        thread.start()
        groups = wait_for(lambda: [g for g in cpu_class.shadow_groups()
                                   if (Path(g) / "cgroup.procs").read_text().split()], 240,
                          "the shadow's servers to run (in the idle CPU class)")
        wait_for(lambda: (deployment.state().get("shadow") or {}).get("status") == "running",
                 60, "the shadow window to start")
        fault_at = time.monotonic()
        for group in groups:
            for pid in (Path(group) / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the shadow deploy did not end"
        ended_at = time.monotonic()
        _settle(load, 2.0)
    answers = load.since(fault_at)
    failed, streak, _first, _recovered = failure_streak(answers)
    error = outcome.get("error")
    chaos_results.append(FaultResult(
        "kill -9 the shadow's server mid-window", len(answers), failed, streak,
        ended_at - fault_at, "none (shadow rejected, live version unchanged)",
        "task_failed (the deploy task's failure callback)",
        "0 failed live requests, shadow rejected"))
    assert failed == 0, [a for a in answers if not a.ok][:5]
    assert isinstance(error, DeployError), outcome  # rejected (no answer, or the rule)
    assert deployment.live()["model_version"] == live_version
    assert deployment.state()["shadow"]["outcome"] == "rejected"
    assert not cpu_class.shadow_groups()
    assert _healthy_everywhere(deployment)
