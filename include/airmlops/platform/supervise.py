"""The platform's processes: pidfiles, starting one detached, stopping them, their status.

Each component runs in a process group of its own whose id is the pid in its pidfile
(``<run dir>/pids/<name>.pid``, the pid then the process start time, which guards against pid
reuse), and logs to ``<run dir>/logs/<name>.log``. One ``up`` or ``down`` works on a run dir
at a time (:func:`platform_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airmlops.embedded_pg import running_postgres, stop_postgres
from airmlops.paths import atomic_write_json, atomic_write_text
from airmlops.platform.config import (
    AIRFLOW_COMPONENTS,
    MLFLOW,
    POSTGRES,
    WATCHDOG,
    PlatformError,
    Progress,
    load_recorded_config,
)
from airmlops.platform.environment import common_env
from airmlops.processes import file_tail, process_alive, reap, spawn_detached

ORPHANS_FILE = "orphans.json"
"""Under ``<run_dir>/pids``: process groups of components that died, with what they left."""
IDLE_MARK = "<idle>"
"""What an Airflow executor worker's process title says while it runs no task."""


@dataclass(frozen=True)
class ProcessRecord:
    """A started component: its pid (= its process group id) and start time (guards pid reuse)."""

    name: str
    pid: int
    create_time: float


def pidfile(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "pids" / f"{name}.pid"


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    """The pidfile of ``name`` (first line the pid, second the process start time), if any."""
    try:
        lines = pidfile(run_dir, name).read_text().split()
        return ProcessRecord(name=name, pid=int(lines[0]), create_time=float(lines[1]))
    except (FileNotFoundError, IndexError, ValueError):
        return None


def is_alive(record: ProcessRecord | None) -> bool:
    """True if the recorded process still runs (same pid and start time, not a zombie)."""
    return record is not None and process_alive(record.pid, record.create_time)


def spawn(
    run_dir: Path, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
) -> ProcessRecord:
    """Start ``argv`` in a new session (its own process group, no terminal), log to
    ``logs/<name>.log`` and write its pidfile. The process outlives the caller.

    :func:`airmlops.processes.spawn_detached` does the starting; this adds what makes it a
    platform component: the log's place and banner, and the pidfile.
    """
    from airmlops.settings import PROJECT_ROOT

    run_dir = Path(run_dir)
    proc = spawn_detached(
        argv,
        env,
        run_dir / "logs" / f"{name}.log",
        cwd or PROJECT_ROOT,
        banner=f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n",
    )
    record = ProcessRecord(name=name, pid=proc.pid, create_time=proc.create_time())
    atomic_write_text(pidfile(run_dir, name), f"{record.pid}\n{record.create_time}\n")
    return record


def log_tail(run_dir: Path, name: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a component's log under a header naming it (for error
    messages); :func:`airmlops.processes.file_tail` reads them."""
    path = Path(run_dir) / "logs" / f"{name}.log"
    if not path.exists():
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n{file_tail(path, lines)}"


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _group_is_ours(record: ProcessRecord) -> bool:
    """True unless the leader's pid now belongs to an unrelated process (pid reuse).

    A process group id cannot be handed to a new process while any member of the group lives,
    so when the leader is gone, the remaining members of the group are our leftovers.
    """
    import psutil

    try:
        return abs(psutil.Process(record.pid).create_time() - record.create_time) <= 0.01
    except psutil.NoSuchProcess:
        return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_groups_gone(pending: list[ProcessRecord], timeout: float, poll: float) -> list[
    ProcessRecord
]:
    """Wait up to ``timeout`` s for the groups of ``pending`` to empty; return those that
    did not."""
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(poll)
        for record in pending:
            reap(record.pid)
        pending = [r for r in pending if group_members(r.pid)]
    return pending


def stop_components(
    run_dir: Path, names: Sequence[str], timeout: float = 10.0, progress: Progress | None = None
) -> list[str]:
    """SIGTERM the process groups of ``names``, wait up to ``timeout`` s, then SIGKILL what is
    left (the triggerer ignores SIGTERM for a while). Removes the pidfiles. Returns the names
    that had something running."""
    records = [r for r in (read_record(run_dir, n) for n in names) if r is not None]
    ours = [r for r in records if _group_is_ours(r)]
    running = [r for r in ours if is_alive(r) or group_members(r.pid)]
    for record in running:
        _signal_group(record.pid, signal.SIGTERM)
    pending = _wait_groups_gone(list(running), timeout, poll=0.2)
    for record in pending:
        if progress:
            progress(f"{record.name}: still running after {timeout:.0f} s, killing it")
        _signal_group(record.pid, signal.SIGKILL)
    pending = _wait_groups_gone(pending, 5.0, poll=0.1)
    if pending:
        raise PlatformError(f"could not stop {', '.join(r.name for r in pending)}")
    for name in names:
        pidfile(run_dir, name).unlink(missing_ok=True)
    return [r.name for r in running]


def stop_all(run_dir: Path, timeout: float = 10.0, progress: Progress | None = None) -> list[str]:
    """Stop every component of the platform in ``run_dir``, then its PostgreSQL. Idempotent.

    Returns the names of what was running.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        return []
    names = [WATCHDOG, MLFLOW, *AIRFLOW_COMPONENTS]  # the watchdog would restart the others
    with platform_lock(run_dir, progress):
        stopped = stop_components(run_dir, names, timeout=timeout, progress=progress)
        if stop_idle_orphans(run_dir, everything=True):  # what killed components left behind
            stopped.append("leftovers of restarted components")
        if stop_postgres(run_dir):
            stopped.append(POSTGRES)
    return stopped


def stop_deployments(timeout: float = 10.0) -> list[str]:
    """Stop the model services and stable-address proxies the deploy stage started."""
    from airmlops.settings import get_settings

    root = get_settings().data_root
    stopped = []
    for state in sorted((root / "deployments").glob("*/state.json")):
        from airmlops.serving.deploy import undeploy

        pipeline = state.parent.name
        if undeploy(pipeline, root, timeout=timeout):
            stopped.append(f"deployment {pipeline}")
    return stopped


@contextlib.contextmanager
def platform_lock(run_dir: Path, progress: Progress | None = None) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per run dir (children never inherit the lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "platform.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress("another `up` or `down` is working on this run dir; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def component_status(run_dir: Path) -> dict[str, dict[str, Any]]:
    """For postgres and each component: whether it is alive and its pid."""
    run_dir = Path(run_dir).resolve()
    pg = running_postgres(run_dir)
    status: dict[str, dict[str, Any]] = {
        POSTGRES: {"alive": pg is not None, "pid": pg.pid if pg else None}
    }
    recorded = load_recorded_config(run_dir)
    names = recorded.components() if recorded else (MLFLOW, *AIRFLOW_COMPONENTS)
    for name in (*names, WATCHDOG):
        record = read_record(run_dir, name)
        status[name] = {"alive": is_alive(record), "pid": record.pid if record else None}
    return status


# --- the watchdog's process and what restarted components leave behind ---------------------


def start_watchdog(run_dir: Path, base_env: Mapping[str, str] | None = None
                   ) -> ProcessRecord:
    """Start the watchdog of ``run_dir`` unless it runs; return its record."""
    record = read_record(run_dir, WATCHDOG)
    if is_alive(record):
        assert record is not None
        return record
    argv = [sys.executable, "-m", "airmlops.platform.watchdog",
            "--run-dir", str(Path(run_dir).resolve())]
    return spawn(run_dir, WATCHDOG, argv, common_env(base_env))


def _orphans_path(run_dir: Path) -> Path:
    return Path(run_dir) / "pids" / ORPHANS_FILE


def _load_orphans(run_dir: Path) -> list[int]:
    try:
        groups = json.loads(_orphans_path(run_dir).read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [g for g in groups if isinstance(g, int) and g > 1] if isinstance(groups, list) else []


def _save_orphans(run_dir: Path, groups: list[int]) -> None:
    path = _orphans_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, sorted(set(groups)))


def record_orphans(run_dir: Path, pgid: int) -> None:
    """Remember the process group of a dead component if anything of it still runs."""
    if group_members(pgid):
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
        members = group_members(pgid)
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
