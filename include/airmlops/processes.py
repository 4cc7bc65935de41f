"""Starting the platform's own child processes: a free loopback port, a detached start, and
the minimal environment a serving process gets.

Airflow and MLflow are configured through their environment and get theirs from
:mod:`airmlops.platform`. Every other process the platform starts (model-service slots, the
stable-address proxy, a bento build) is not trusted with the platform's secrets: it starts from
:func:`child_env`, an allow-list of the parent's variables (``PATH``, ``HOME``, locale, time zone,
temporary folder, plus the keys of its :class:`ChildKind`), never the parent's whole environment.
Names that look like someone else's secret (``AIRFLOW__*``, ``*_SECRET*``, ``*_PASSWORD*``,
``*_KEY``, database URLs...) are never copied, and refused when a caller passes them explicitly,
unless the kind lists them as its own (the model service's bearer token, its Redis URL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airmlops.settings import process_environment

HOST = "127.0.0.1"

BASE_NAMES: frozenset[str] = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
"""Variables every child keeps from its parent (with ``LC_*``): none of them is a secret."""
BASE_PREFIXES: tuple[str, ...] = ("LC_",)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SECRET_NAME_RE = re.compile(
    r"^AIRFLOW__|^AIRFLOW_CONN_|^AIRFLOW_VAR_|SECRET|PASSWORD|PASSWD|CREDENTIAL|TOKEN|_KEY$|_KEY_|"
    r"^KEY$|SQL_ALCHEMY|DATABASE|_DSN$|_URI$|_URL$|_CONN$",
    re.IGNORECASE,
)
"""Names that may carry a secret (a key, a password, a URL with credentials in it)."""


@dataclasses.dataclass(frozen=True)
class ChildKind:
    """What one kind of child process may receive beyond :data:`BASE_NAMES`.

    ``names`` and ``prefixes`` are copied from the parent when present; ``own_secrets`` are the
    secret-looking names among them that are this kind's own (its token, its store's URL).
    ``fixed`` is always set, whatever the parent has.
    """

    name: str
    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    own_secrets: frozenset[str] = frozenset()
    own_secret_prefixes: tuple[str, ...] = ()
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def allows(self, name: str) -> bool:
        """True if ``name`` may reach this kind of process."""
        if name in BASE_NAMES or name.startswith(BASE_PREFIXES):
            return True
        if name not in self.names and not name.startswith(self.prefixes):
            return False
        return (not looks_secret(name) or name in self.own_secrets
                or name.startswith(self.own_secret_prefixes))


MODEL_SERVICE = ChildKind(
    name="model service",
    # The data root holds the SQLite prediction log; the service reads no source file, so the
    # allowed data roots are not its business (its spec is checked by hash).
    names=frozenset({"BENTOML_HOME", "MLOPS_DATA_ROOT", "MLOPS_REDIS_URL"}),
    prefixes=("MLOPS_SERVING_", "MLOPS_PREDICTION_LOG_"),
    own_secrets=frozenset(
        {"MLOPS_REDIS_URL", "MLOPS_SERVING_TOKEN", "MLOPS_PREDICTION_LOG_REDIS_URL"}
    ),
    fixed={
        "BENTOML_DO_NOT_TRACK": "true",
        "DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        # circus renames its arbiter with setproctitle, which by default overwrites the
        # process's environment block: /proc/<pid>/environ (the deployment markers that find a
        # slot's processes, an audit of what the slot holds) must stay readable.
        "SPT_NOENV": "1",
    },
)
"""A ``bentoml serve`` slot: its store, data root, online store / prediction log and serving
settings (``MLOPS_SERVING_*``, ``MLOPS_PREDICTION_LOG_*``, see :mod:`airmlops.settings`)."""

PROXY = ChildKind(
    name="stable-address proxy",
    prefixes=("MLOPS_PROXY_",),
    fixed={"PYTHONUNBUFFERED": "1"},
)
"""The stable-address proxy: its admin token is a file in its state folder, not a variable."""

SERVING_SUPERVISOR = ChildKind(
    name="serving supervisor",
    names=MODEL_SERVICE.names,
    prefixes=(*MODEL_SERVICE.prefixes, "MLOPS_ALERT_"),
    own_secrets=MODEL_SERVICE.own_secrets,
    own_secret_prefixes=("MLOPS_ALERT_",),
    fixed=MODEL_SERVICE.fixed,
)
"""The supervisor of a deployment (:mod:`airmlops.serving.deploy.supervisor`): what the model
services it restarts need (it hands them :data:`MODEL_SERVICE`'s share only) plus the alert
channels' credentials (``MLOPS_ALERT_*``), which no model service ever gets."""

BENTO_BUILD = ChildKind(
    name="bento build",
    names=frozenset({"BENTOML_HOME", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT",
                     "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                     "no_proxy"}),
    prefixes=("PIP_", "UV_"),
    fixed={"BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"},
)
"""``bentoml build`` in a fresh interpreter: its store and how packages are reached, nothing of
the worker's Airflow, MLflow or database settings."""


def looks_secret(name: str) -> bool:
    """True if the variable ``name`` may hold a secret (judged by its name only)."""
    return bool(_SECRET_NAME_RE.search(name))


def child_env(
    kind: ChildKind,
    extra: Mapping[str, str] | None = None,
    *,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The whole environment of a ``kind`` child: the allowed part of ``parent`` (this
    process's environment by default), then ``extra``, then ``kind.fixed``.

    ``extra`` is what the caller hands the child on purpose; a name the kind does not allow is
    refused with ValueError naming it (never its value), so a secret cannot be passed by mistake.
    """
    parent = process_environment() if parent is None else parent
    env = {name: value for name, value in parent.items() if kind.allows(name)}
    for name, value in (extra or {}).items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"environment variable {name} must be a string without NUL bytes")
        if not kind.allows(name):
            raise ValueError(
                f"environment variable {name} may not be passed to a {kind.name}: expected "
                f"one of {sorted(kind.names)} or a name starting with {list(kind.prefixes)}"
                + (", and no other process's secret" if looks_secret(name) else "")
            )
        env[name] = value
    env.update(kind.fixed)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    """True if ``port`` can be bound on 127.0.0.1 now (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def spawn_detached(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path,
    *,
    banner: str | None = None,
) -> Any:
    """Start ``argv`` in a session of its own (own process group, no terminal, stdin closed),
    output appended to ``log_path`` after ``banner``; return its psutil Process.

    ``env`` is the child's whole environment: nothing is inherited. The child outlives the
    caller, which never waits for it.
    """
    import psutil

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        if banner:
            log.write(banner.encode())
            log.flush()
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.returncode = 0  # not ours to wait for: silence Popen's ResourceWarning
    return psutil.Process(proc.pid)


# --------------------------------------------------------------------------------------------
# Watching and stopping started processes (the platform's components, deployments' slots)
# --------------------------------------------------------------------------------------------


class StopFailed(RuntimeError):
    """A process survived SIGKILL (the message names the pids)."""


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our exited child (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """True if ``pid`` still runs and is the process we started (same start time, no zombie)."""
    import psutil

    if pid is None or create_time is None:
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01:
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            reap(pid)
            return False
    except psutil.NoSuchProcess:
        return False
    return True


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants' pids (empty if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def marked_processes(name: str, value: str) -> list[Any]:
    """Live processes whose environment has ``name=value`` (a deployment or instance marker).

    BentoML's arbiter starts each worker in a session of its own, so a process group does not
    hold a slot's processes; the inherited environment marker does.
    """
    import psutil

    needle = f"{name}={value}"
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            environ = proc.environ()
        except (psutil.Error, OSError):
            continue
        if f"{name}={environ.get(name)}" == needle:
            found.append(proc)
    return found


def terminate(procs: Sequence[Any], timeout: float) -> list[Any]:
    """SIGTERM ``procs``, wait up to ``timeout`` s, SIGKILL the rest; return those still alive."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(list(procs), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    _gone, alive = psutil.wait_procs(alive, timeout=5.0)
    return alive


def stop_process(
    pid: int | None, create_time: float | None, marker: tuple[str, str] | None, timeout: float
) -> bool:
    """Stop a started process (and its children) and every process carrying ``marker`` (an
    environment ``(name, value)``): SIGTERM, SIGKILL after ``timeout`` s. True if anything ran;
    :class:`StopFailed` if something survived."""
    import psutil

    procs = []
    if process_alive(pid, create_time):
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(pid)
            procs.append(leader)
            procs.extend(leader.children(recursive=True))
    if marker is not None:
        known = {p.pid for p in procs}
        procs.extend(p for p in marked_processes(*marker) if p.pid not in known)
    if not procs:
        return False
    # The leader first (BentoML's arbiter stops its workers itself), then anything left.
    leaders = procs[:1] if pid is not None and procs[0].pid == pid else []
    survivors = terminate(leaders, timeout) if leaders else []
    rest = [p for p in procs[len(leaders) :] if p.is_running()] + survivors
    if rest:
        still = terminate(rest, timeout)
        if still:
            raise StopFailed(f"could not stop processes {[p.pid for p in still]}")
    if pid is not None:
        reap(pid)
    return True


def file_tail(path: str | Path | None, lines: int = 100) -> str:
    """The last ``lines`` lines of a log file (at most its last 64 KiB); "" if unreadable."""
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
