"""The embedded platform's watchdog: a component that dies is started again, nobody acting.

``python -m airmlops.platform.watchdog --run-dir R`` is started by ``platform up`` (its pidfile is
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
import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from airmlops.embedded_pg import start_postgres
from airmlops.platform.components import start_airflow, start_mlflow
from airmlops.platform.config import (
    AIRFLOW_COMPONENTS,
    MLFLOW,
    PlatformConfig,
    load_recorded_config,
)
from airmlops.platform.environment import airflow_env
from airmlops.platform.secrets import ensure_secrets
from airmlops.platform.supervise import (
    is_alive,
    platform_lock,
    read_record,
    record_orphans,
    stop_idle_orphans,
)

logger = logging.getLogger("airmlops.watchdog")

INTERVAL = 1.0
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 60.0


@dataclasses.dataclass
class _Backoff:
    delay: float = BACKOFF_INITIAL
    not_before: float = 0.0
    started: float = 0.0


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
        config = load_recorded_config(self.run_dir)
        if config is None:
            return False
        dead = [name for name in config.components()
                if not is_alive(read_record(self.run_dir, name))
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

    def _restart(self, config: PlatformConfig, dead: list[str]) -> None:
        with platform_lock(self.run_dir):
            if load_recorded_config(self.run_dir) is None:
                return  # `down` ran while this waited for the lock
            dead = [n for n in dead
                    if not is_alive(read_record(self.run_dir, n))]
            if not dead:
                return
            for name in dead:
                self._started(name)
                record = read_record(self.run_dir, name)
                if record is not None:
                    record_orphans(self.run_dir, record.pid)
            logger.warning("%s died; starting %s again", ", ".join(dead),
                           "it" if len(dead) == 1 else "them")
            try:
                pg = start_postgres(self.run_dir)
                if MLFLOW in dead:
                    start_mlflow(config, pg, self.base_env)
                airflow = [n for n in AIRFLOW_COMPONENTS if n in dead]
                if airflow:
                    env = airflow_env(config, pg, ensure_secrets(config),
                                               self.base_env)
                    start_airflow(config, env, airflow)
            except Exception:  # the next look tries again, after the backoff
                logger.exception("could not start %s again", ", ".join(dead))
                return
            self.restarted.extend(dead)
            logger.info("started %s again", ", ".join(dead))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airmlops.platform.watchdog",
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
