"""The supervisor of a deployment: what dies is restarted, and someone is told.

``python -m airmlops.serving.deploy.supervisor --pipeline P --root R`` runs beside a pipeline's
stable address (one per deployment, started by every deploy with the model services'
environment and the spec's ``alerts`` section, saved as ``alerts.json`` in the deployment's
folder). Every :data:`INTERVAL` seconds it compares what the state file records with what runs:

* a dead **proxy** is started again on its port (it reloads its routing table), and the
  ``proxy_died`` alert goes out;
* a dead **model server** of a ``process`` slot (its process gone, e.g. ``kill -9``) has its
  leftovers stopped and is started again on the same port with the same version, and the
  ``slot_died`` alert goes out. While it restarts the stable address routes around it (to the
  slot's other replicas, or another slot of the same version) or answers 503 with
  ``Retry-After``. Restarts back off: 0.5 s after a death, doubling up to 30 s while a server
  keeps dying within a minute of its start, so a version that cannot run does not spin a core.
  ``docker`` slots are restarted by the engine (their containers run with a restart policy);
* the address's own counters are read every second: a ``failover`` or a 503 for want of any
  healthy server (``serving_unavailable``) is alerted;
* the live servers' prediction-log counters (``/readyz``) are read every five seconds: entries
  dropped past the spill folder's disk bound are alerted (``log_dropped``), and entries the
  backend refused, set aside in the spill folder's quarantine (``log_quarantined``).

Deploy, rollback and undeploy hold the pipeline's lock while they work; the supervisor only acts
when it can take the lock at once, so it never restarts what an operation is stopping. It exits
when the deployment is gone (undeployed) or another supervisor has been recorded in its place.
Alerts of one kind go out at most once a minute (the next one says how many were held back);
they are sent from a thread, so a slow mail relay never delays a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from airmlops.alerts import AlertsConfig, AlertThrottle
from airmlops.paths import atomic_write_json
from airmlops.processes import (
    SERVING_SUPERVISOR,
    child_env,
    port_free,
    process_alive,
    spawn_detached,
    stop_process,
)
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy.state import (
    DEPLOYMENT_MARKER,
    handle_from_record,
    instance_record,
    instances,
    load_state,
    save_state,
    validate_env,
    validate_pipeline,
)
from airmlops.serving.deploy.state import deployment_dir as _deployment_dir
from airmlops.serving.prediction_log.spill import QUARANTINE_DIR, spill_dir_path

logger = logging.getLogger("airmlops.serving.supervisor")

INTERVAL = 0.5
"""Seconds between two looks at what runs."""
COUNTERS_INTERVAL = 1.0
"""Seconds between two reads of the stable address's counters."""
LOG_CHECK_INTERVAL = 5.0
"""Seconds between two reads of the model servers' prediction-log counters (``/readyz``)."""
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
"""A server alive this long since its last start is healthy again: its backoff starts over."""
PORT_WAIT = 3.0
"""Longest wait for a dead server's port to be released before it is started there again."""
ALERT_EVERY = 60.0
"""At most one alert of each kind per this many seconds."""
ALERTS_FILE = "alerts.json"


# --------------------------------------------------------------------------------------------
# Started by deploy and rollback
# --------------------------------------------------------------------------------------------


def restart_supervisor(pipeline: str, root: Path, state: dict[str, Any],
                       env: Mapping[str, str] | None, alerts: Mapping[str, Any] | None) -> None:
    """Stop the deployment's supervisor if one runs and start a new one with ``env`` (what the
    model services it restarts get) and ``alerts`` (the spec's ``alerts`` section; None keeps
    the saved one). Records it in ``state`` (the caller saves, under the lock)."""
    directory = _deployment_dir(pipeline, root)
    if alerts is not None:
        atomic_write_json(directory / ALERTS_FILE, dict(alerts))
    stop_supervisor(state)
    argv = [sys.executable, "-m", "airmlops.serving.deploy.supervisor", "--pipeline", pipeline,
            "--root", str(Path(root).resolve())]
    child = {**child_env(SERVING_SUPERVISOR, validate_env(env)),
             DEPLOYMENT_MARKER: state["deployment_id"]}
    proc = spawn_detached(argv, child, directory / "logs" / "supervisor.log", cwd=directory)
    state["supervisor"] = {"pid": proc.pid, "create_time": proc.create_time()}
    logger.info("supervisor of %s started (pid %s)", pipeline, proc.pid)


def supervisor_alive(state: Mapping[str, Any]) -> bool:
    record = state.get("supervisor") or {}
    return process_alive(record.get("pid"), record.get("create_time"))


def stop_supervisor(state: dict[str, Any], timeout: float = 5.0) -> bool:
    """Stop the recorded supervisor; True if one ran."""
    record = state.get("supervisor") or {}
    stopped = stop_process(record.get("pid"), record.get("create_time"), None, timeout)
    state["supervisor"] = None
    return stopped


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Backoff:
    delay: float = BACKOFF_INITIAL
    not_before: float = 0.0
    started: float = 0.0


@contextlib.contextmanager
def _try_locked(directory: Path) -> Iterator[bool]:
    """The deployment's lock if nobody holds it now (never waits)."""
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Supervisor:
    """One deployment's watcher; :meth:`check` is one look (tests drive it directly)."""

    def __init__(self, pipeline: str, root: Path, *, clock: Any = time.monotonic) -> None:
        self.pipeline = validate_pipeline(pipeline)
        self.root = Path(root)
        self.directory = _deployment_dir(pipeline, self.root)
        self.clock = clock
        self.backoff: dict[str, _Backoff] = {}
        self.alerts = _load_alerts(self.directory / ALERTS_FILE)
        self.throttle = AlertThrottle(ALERT_EVERY, clock)
        self.counters: dict[str, int] | None = None
        self.counters_read = 0.0
        self.dropped: dict[str, int] = {}
        self.quarantined: dict[str, int] = {}
        self.logs_read = 0.0
        self.restarts = 0
        self._alerting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alerts")

    def check(self) -> bool:
        """Restart what died; False once there is nothing left to watch (or another
        supervisor took over)."""
        state = None
        with _try_locked(self.directory) as got:
            if got:
                state = load_state(self.pipeline, self.root)
                if not self._mine(state):
                    return False
                changed = self._check_proxy(state)
                changed = self._check_slots(state) or changed
                if changed:
                    save_state(self.pipeline, self.root, state)
        if state is not None:
            self._check_counters(state)
            self._check_prediction_logs(state)
        return True

    def _mine(self, state: Mapping[str, Any]) -> bool:
        if not state.get("proxy") and not any(state["slots"].values()):
            logger.info("%s is undeployed: nothing left to supervise", self.pipeline)
            return False
        recorded = (state.get("supervisor") or {}).get("pid")
        if recorded is not None and recorded != os.getpid():
            logger.info("another supervisor (pid %s) watches %s now", recorded, self.pipeline)
            return False
        return True

    def _due(self, key: str) -> bool:
        backoff = self.backoff.setdefault(key, _Backoff())
        return self.clock() >= backoff.not_before

    def _started(self, key: str) -> float:
        """Record a restart of ``key``; return the delay before the next one may happen."""
        now = self.clock()
        backoff = self.backoff.setdefault(key, _Backoff())
        if backoff.started and now - backoff.started >= STABLE_AFTER:
            backoff.delay = BACKOFF_INITIAL
        delay = backoff.delay
        backoff.not_before, backoff.started = now + delay, now
        backoff.delay = min(delay * 2, BACKOFF_MAX)
        self.restarts += 1
        return delay

    def _check_proxy(self, state: dict[str, Any]) -> bool:
        from airmlops.serving.deploy.proxy_control import ensure_proxy_locked

        record = state.get("proxy") or {}
        if not record or process_alive(record.get("pid"), record.get("create_time")):
            return False
        if not self._due("proxy"):
            return False
        self._started("proxy")
        logger.warning("the proxy of %s (pid %s) died; starting it again on port %s",
                       self.pipeline, record.get("pid"), record.get("port"))
        _wait_port_free(int(record["port"]), PORT_WAIT)
        try:
            handle = ensure_proxy_locked(self.pipeline, int(record["port"]), self.root, state,
                                         timeout=20.0)
        except Exception as exc:
            logger.error("the proxy of %s could not be started again: %s", self.pipeline, exc)
            self._alert("proxy_died", f"the stable address of {self.pipeline} died and could "
                        f"not be started again: {exc}", {"port": record.get("port")})
            return False
        self._alert("proxy_died", f"the stable address of {self.pipeline} died and was started "
                    "again", {"port": handle.port, "old_pid": record.get("pid"),
                              "new_pid": handle.pid})
        return True

    def _check_slots(self, state: dict[str, Any]) -> bool:
        changed = False
        for slot, record in state["slots"].items():
            if not record or record.get("target") != "process":
                continue  # docker slots: the engine's restart policy
            for index, one in enumerate(instances(record)):
                if process_alive(one.get("pid"), one.get("create_time")):
                    continue
                key = f"{slot}/{index}"
                if not self._due(key):
                    continue
                changed = self._restart(state, slot, record, one, key) or changed
        return changed

    def _restart(self, state: dict[str, Any], slot: str, record: dict[str, Any],
                 one: dict[str, Any], key: str) -> bool:
        from airmlops.serving.deploy.slots import start_slot, stop_slot

        delay = self._started(key)
        dead = handle_from_record(record, one)
        live = slot == state.get("active")
        logger.warning("model server %s of %s (slot %s, version %s, pid %s) died; starting it "
                       "again on port %s", key, self.pipeline, slot, record["model_version"],
                       one.get("pid"), dead.port)
        with contextlib.suppress(Exception):
            stop_slot(dead, timeout=2.0)  # workers it left behind hold its port
        _wait_port_free(dead.port, PORT_WAIT)
        home = record.get("bentoml_home")
        details = {"slot": slot, "live": live, "version": record["model_version"],
                   "port": dead.port, "old_pid": one.get("pid"),
                   "restarts": one.get("restarts", 0) + 1, "next_backoff_s": delay}
        try:
            handle = start_slot(
                "process", record["artifact"], dead.port, None,
                name=f"{self.pipeline}-{slot}-{dead.port}".replace("_", "-"),
                log_dir=self.directory / "logs", bentoml_home=Path(home) if home else None,
                deployment_id=state["deployment_id"],
            )
        except Exception as exc:
            logger.error("model server %s of %s could not be started again: %s", key,
                         self.pipeline, exc)
            self._alert("slot_died", f"a model server of {self.pipeline} (slot {slot}, version "
                        f"{record['model_version']}) died and could not be started again: "
                        f"{exc}", details)
            return False
        one.update(instance_record(handle))
        one["restarts"] = details["restarts"]
        self._alert("slot_died", f"a model server of {self.pipeline} (slot {slot}, version "
                    f"{record['model_version']}) died and was started again",
                    {**details, "new_pid": handle.pid})
        return True

    def _check_counters(self, state: Mapping[str, Any]) -> None:
        now = self.clock()
        port = (state.get("proxy") or {}).get("port")
        if not port or now - self.counters_read < COUNTERS_INTERVAL:
            return
        self.counters_read = now
        try:
            current = proxy_mod.get_state(int(port), timeout=1.0)
        except proxy_mod.ProxyAdminError:
            return
        counters = {name: int(current.get(name) or 0) for name in ("failovers", "unavailable")}
        before, self.counters = self.counters, counters
        if before is None:
            return
        if counters["failovers"] > before["failovers"]:
            self._alert("failover", f"the stable address of {self.pipeline} routed around its "
                        "live servers to another slot of the same version",
                        {"failovers": counters["failovers"] - before["failovers"],
                         "active": current.get("active")})
        if counters["unavailable"] > before["unavailable"]:
            self._alert("serving_unavailable", f"the stable address of {self.pipeline} had no "
                        "healthy model server and answered 503",
                        {"requests_refused": counters["unavailable"] - before["unavailable"],
                         "active": current.get("active")})

    def _check_prediction_logs(self, state: Mapping[str, Any]) -> None:
        """Alert ``log_dropped`` when a live server's prediction log dropped entries (its spill
        folder reached its disk bound): the only loss of acknowledged predictions; and
        ``log_quarantined`` when it set aside entries its backend refused."""
        now = self.clock()
        active = state.get("active")
        record = state["slots"].get(active) if active else None
        if not record or now - self.logs_read < LOG_CHECK_INTERVAL:
            return
        self.logs_read = now
        for one in instances(record):
            stats = _prediction_log_stats(one["upstream"])
            if stats is None:
                continue
            dropped = int(stats.get("dropped") or 0)
            before = self.dropped.get(one["instance"], 0)
            self.dropped[one["instance"]] = dropped
            if dropped > before:
                self._alert("log_dropped", f"a model server of {self.pipeline} dropped "
                            f"{dropped - before} prediction-log entries: its backend is down and "
                            "the spill folder is full", {"upstream": one["upstream"],
                                                        "dropped_total": dropped,
                                                        "prediction_log": stats})
            self._check_quarantine(one, stats)

    def _check_quarantine(self, one: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
        """Alert ``log_quarantined`` when the count of a server's quarantined entries grew."""
        quarantined = int(stats.get("quarantined") or 0)
        before = self.quarantined.get(one["instance"], 0)
        self.quarantined[one["instance"]] = quarantined
        if quarantined > before:
            folder = spill_dir_path(self.root, self.pipeline) / QUARANTINE_DIR
            self._alert("log_quarantined", f"a model server of {self.pipeline} quarantined "
                        f"{quarantined - before} prediction-log entries its backend refused: "
                        f"they are kept in {folder} on its host", {
                            "upstream": one["upstream"], "quarantined_total": quarantined,
                            "quarantine_dir": str(folder), "prediction_log": dict(stats)})

    def _alert(self, event: str, message: str, details: Mapping[str, Any]) -> None:
        """Send ``event`` from the alert thread (at most one of a kind per :data:`ALERT_EVERY`
        seconds; the next one says how many were held back)."""
        self._alerting.submit(self._send, event, message, dict(details))

    def _send(self, event: str, message: str, details: Mapping[str, Any]) -> None:
        try:
            result = self.throttle.notify_config(self.pipeline, self.alerts, event, message,
                                                 details)
            logger.info("alert %s: %s", event, json.dumps(result, default=str))
        except Exception:  # an alert never stops the supervision
            logger.exception("alert %s could not be sent", event)

    def close(self) -> None:
        """Wait for the alerts still being sent."""
        self._alerting.shutdown(wait=True, cancel_futures=False)


def _wait_port_free(port: int, timeout: float) -> bool:
    """Wait until nothing holds ``port`` (a killed server's sockets close as its processes are
    reaped, a moment after they die)."""
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _prediction_log_stats(upstream: str) -> dict[str, Any] | None:
    """The ``prediction_log`` part of a model server's ``/readyz`` answer (None if unknown)."""
    import httpx

    try:
        body = httpx.get(f"{upstream}/readyz", timeout=1.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return None
    stats = body.get("prediction_log") if isinstance(body, dict) else None
    return stats if isinstance(stats, dict) else None


def _load_alerts(path: Path) -> AlertsConfig | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        logger.error("alerts config %s is not valid JSON (%s): alerts are off", path, exc)
        return None
    if not data:
        return None
    try:
        return AlertsConfig.model_validate(data)
    except ValueError as exc:
        logger.error("alerts config %s is invalid (%s): alerts are off", path, exc)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airmlops.serving.deploy.supervisor",
                                     description="Restart what died of one deployment.")
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--root", required=True, type=Path, help="the data root")
    parser.add_argument("--interval", type=float, default=INTERVAL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    supervisor = Supervisor(args.pipeline, args.root)
    logger.info("supervising %s (every %g s)", args.pipeline, args.interval)
    try:
        while supervisor.check():
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
