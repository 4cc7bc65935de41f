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

import dataclasses
import os
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def allows(self, name: str) -> bool:
        """True if ``name`` may reach this kind of process."""
        if name in BASE_NAMES or name.startswith(BASE_PREFIXES):
            return True
        if name not in self.names and not name.startswith(self.prefixes):
            return False
        return not looks_secret(name) or name in self.own_secrets


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
settings (``MLOPS_SERVING_*``, ``MLOPS_PREDICTION_LOG_*``, see :mod:`airmlops.serving.service`)."""

PROXY = ChildKind(
    name="stable-address proxy",
    prefixes=("MLOPS_PROXY_",),
    fixed={"PYTHONUNBUFFERED": "1"},
)
"""The stable-address proxy: its admin token is a file in its state folder, not a variable."""

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
    parent = os.environ if parent is None else parent
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
