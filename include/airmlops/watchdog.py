"""The embedded platform's watchdog: a component that dies is started again, nobody acting.

``python -m airmlops.watchdog --run-dir R`` is started by ``platform up`` (its pidfile is
``watchdog``) and stopped first by ``platform down``. Every :data:`INTERVAL` seconds it reads the
recorded configuration of the run directory and the pidfiles of its components (MLflow unless an
external one is used, the Airflow api-server, scheduler, dag-processor, triggerer and log
server); one found dead is started again exactly as ``up`` starts it (PostgreSQL too, through
the same idempotent start), under the platform lock, so it never races an ``up`` or ``down``.
Restarts back off (1 s doubling up to 60 s while a component keeps dying within a minute of its
start). Work a killed scheduler left behind is Airflow's to recover: its executor's task
processes finish and report through the API server, and tasks it had only queued are reset by
the next scheduler; a task that lost its process is retried (the DAGs' retries).

What a killed component leaves behind in its process group (the scheduler's LocalExecutor
workers, forked with its database connection) is recorded in ``pids/orphans.json``: each look
stops the members that are idle (a busy one finishes its task first), so the inherited
connection closes and the transaction it held ends; ``down`` stops whatever is left. The
embedded PostgreSQL also ends any session idle inside a transaction for a minute
(:data:`airmlops.embedded_pg.IDLE_IN_TRANSACTION_TIMEOUT`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from airmlops import platform

logger = logging.getLogger("airmlops.watchdog")

WATCHDOG = platform.WATCHDOG
INTERVAL = 1.0
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 60.0
ORPHANS_FILE = "orphans.json"
"""Under ``<run_dir>/pids``: process groups of components that died, with what they left."""
IDLE_MARK = "<idle>"
"""What an Airflow executor worker's process title says while it runs no task."""


@dataclasses.dataclass
class _Backoff:
    delay: float = BACKOFF_INITIAL
    not_before: float = 0.0
    started: float = 0.0


def start_watchdog(run_dir: Path, base_env: Mapping[str, str] | None = None
                   ) -> platform.ProcessRecord:
    """Start the watchdog of ``run_dir`` unless it runs; return its record."""
    record = platform.read_record(run_dir, WATCHDOG)
    if platform.is_alive(record):
        assert record is not None
        return record
    argv = [sys.executable, "-m", "airmlops.watchdog", "--run-dir", str(Path(run_dir).resolve())]
    return platform.spawn(run_dir, WATCHDOG, argv, platform._base_env(base_env))


class Watchdog:
    """:meth:`check` is one look at the run directory (tests drive it directly)."""

    def __init__(self, run_dir: Path, base_env: Mapping[str, str] | None = None,
                 clock=time.monotonic) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.base_env = base_env
        self.clock = clock
        self.backoff: dict[str, _Backoff] = {}
        self.restarted: list[str] = []

    def check(self) -> bool:
        """Restart dead components; False once the platform is gone (``down``)."""
        config = platform.load_recorded_config(self.run_dir)
        if config is None:
            return False
        dead = [name for name in config.components()
                if not platform.is_alive(platform.read_record(self.run_dir, name))
                and self._due(name)]
        if dead:
            self._restart(config, dead)
        stop_idle_orphans(self.run_dir)
        return True

    def _due(self, name: str) -> bool:
        return self.clock() >= self.backoff.setdefault(name, _Backoff()).not_before

    def _started(self, name: str) -> None:
        now = self.clock()
        backoff = self.backoff.setdefault(name, _Backoff())
        if backoff.started and now - backoff.started >= STABLE_AFTER:
            backoff.delay = BACKOFF_INITIAL
        backoff.not_before, backoff.started = now + backoff.delay, now
        backoff.delay = min(backoff.delay * 2, BACKOFF_MAX)

    def _restart(self, config: platform.PlatformConfig, dead: list[str]) -> None:
        from airmlops.embedded_pg import start_postgres

        with platform._platform_lock(self.run_dir):
            if platform.load_recorded_config(self.run_dir) is None:
                return  # `down` ran while this waited for the lock
            dead = [n for n in dead
                    if not platform.is_alive(platform.read_record(self.run_dir, n))]
            if not dead:
                return
            for name in dead:
                self._started(name)
                record = platform.read_record(self.run_dir, name)
                if record is not None:
                    _record_orphans(self.run_dir, record.pid)
            logger.warning("%s died; starting %s again", ", ".join(dead),
                           "it" if len(dead) == 1 else "them")
            try:
                pg = start_postgres(self.run_dir)
                if platform.MLFLOW in dead:
                    platform.start_mlflow(config, pg, self.base_env)
                airflow = [n for n in platform.AIRFLOW_COMPONENTS if n in dead]
                if airflow:
                    env = platform.airflow_env(config, pg, platform.ensure_secrets(config),
                                               self.base_env)
                    platform.start_airflow(config, env, airflow)
            except Exception:  # the next look tries again, after the backoff
                logger.exception("could not start %s again", ", ".join(dead))
                return
            self.restarted.extend(dead)
            logger.info("started %s again", ", ".join(dead))


def _orphans_path(run_dir: Path) -> Path:
    return Path(run_dir) / "pids" / ORPHANS_FILE


def _load_orphans(run_dir: Path) -> list[int]:
    try:
        groups = json.loads(_orphans_path(run_dir).read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [g for g in groups if isinstance(g, int) and g > 1] if isinstance(groups, list) else []


def _save_orphans(run_dir: Path, groups: list[int]) -> None:
    from airmlops.paths import atomic_write_json

    path = _orphans_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, sorted(set(groups)))


def _record_orphans(run_dir: Path, pgid: int) -> None:
    """Remember the process group of a dead component if anything of it still runs."""
    if platform._group_members(pgid):
        _save_orphans(run_dir, [*_load_orphans(run_dir), pgid])


def stop_idle_orphans(run_dir: Path, *, everything: bool = False) -> int:
    """SIGKILL the idle members (all with ``everything``) of recorded orphan groups; forget the
    groups that are empty. Returns how many processes were signalled."""
    import psutil

    groups = _load_orphans(run_dir)
    if not groups:
        return 0
    signalled, left = 0, []
    for pgid in groups:
        members = platform._group_members(pgid)
        if not members:
            continue
        left.append(pgid)
        for pid in members:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if everything or IDLE_MARK in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)  # idle: nothing to lose; SIGTERM waits
                    signalled += 1
    if left != groups:
        _save_orphans(run_dir, left)
    if everything:
        _orphans_path(run_dir).unlink(missing_ok=True)
    return signalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airmlops.watchdog",
                                     description="Restart the embedded platform's components "
                                     "that die.")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=INTERVAL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    watchdog = Watchdog(args.run_dir)
    logger.info("watching %s every %g s", watchdog.run_dir, args.interval)
    try:
        while watchdog.check():
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
