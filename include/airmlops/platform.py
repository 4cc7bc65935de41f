"""The embedded platform on one machine: PostgreSQL, MLflow and Airflow, started and stopped.

``python -m airmlops.platform up [--trigger DAG_ID [--wait]]`` brings up

* an embedded PostgreSQL (unix socket only) holding Airflow's and MLflow's metadata,
* an MLflow tracking server (artifacts proxied by the server into the data root),
* Airflow with LocalExecutor as separate processes: api-server, scheduler, dag-processor,
  triggerer, plus a task-log server bound to loopback,

each in its own process group with a pidfile and a log under the run directory (``.run`` by
default), plus a watchdog (:mod:`airmlops.watchdog`) that starts any of them again when it dies,
and returns while they keep running. ``down`` stops them, ``status`` shows them.
``up`` is idempotent: components found alive (pidfile + process start time) are reused.

Airflow is configured only through the environment of its processes (:func:`airflow_env`),
never through a global file or the caller's environment. Everything listens on 127.0.0.1.
The functions are public so tests start the same platform on free ports in a temporary run
directory without disturbing a running ``make run``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airmlops.embedded_pg import PgHandle, running_postgres, start_postgres, stop_postgres
from airmlops.processes import file_tail, port_free, process_alive, reap, spawn_detached
from airmlops.processes import free_port as free_port  # re-exported: tests pick ports with it

HOST = "127.0.0.1"
DEFAULT_AIRFLOW_PORT = 8080
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_LOG_SERVER_PORT = 8793
DEFAULT_PARALLELISM = 8
"""Task slots of the LocalExecutor; it forks that many workers up front (Airflow default: 32)."""
ADMIN_USER = "admin"

API_SERVER, SCHEDULER, DAG_PROCESSOR, TRIGGERER = (
    "api-server",
    "scheduler",
    "dag-processor",
    "triggerer",
)
LOG_SERVER, MLFLOW, POSTGRES = "log-server", "mlflow", "postgres"
WATCHDOG = "watchdog"
"""The process restarting the others when they die (:mod:`airmlops.watchdog`)."""
AIRFLOW_COMPONENTS = (API_SERVER, SCHEDULER, DAG_PROCESSOR, TRIGGERER, LOG_SERVER)
HEALTH_KEYS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
"""Components that ``/api/v2/monitor/health`` must report healthy."""

_DAG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:+~-]{1,250}$")
_TERMINAL_RUN_STATES = ("success", "failed")

Progress = Callable[[str], None]


class PlatformError(RuntimeError):
    """The platform could not be started, reached or driven; the message says what to look at."""


def loopback_hostname() -> str:
    """Airflow's ``hostname_callable`` here: every component and task runs on this machine.

    The API server fetches logs of running tasks from ``http://<hostname>:<log port>``; a
    loopback name keeps that traffic on 127.0.0.1 whatever the machine's name resolves to.
    """
    return HOST


def _say(message: str) -> None:
    print(f"[platform] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformConfig:
    """Where the platform keeps its state and which loopback ports it serves on."""

    run_dir: Path
    dags_folder: Path
    plugins_folder: Path
    mlflow_artifacts_dir: Path
    airflow_port: int = DEFAULT_AIRFLOW_PORT
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    log_server_port: int = DEFAULT_LOG_SERVER_PORT
    dags_paused_at_creation: bool = False
    parallelism: int = DEFAULT_PARALLELISM
    external_mlflow_uri: str | None = None
    """Use this MLflow server instead of starting one (tests share one across platforms)."""

    @property
    def airflow_url(self) -> str:
        return f"http://{HOST}:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return self.external_mlflow_uri or f"http://{HOST}:{self.mlflow_port}"

    @property
    def airflow_home(self) -> Path:
        return self.run_dir / "airflow"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "passwords.json"

    def components(self) -> tuple[str, ...]:
        """The process components of this platform, in start order."""
        own_mlflow = () if self.external_mlflow_uri else (MLFLOW,)
        return (*own_mlflow, *AIRFLOW_COMPONENTS)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlatformConfig:
        paths = ("run_dir", "dags_folder", "plugins_folder", "mlflow_artifacts_dir")
        known = set(cls.__dataclass_fields__)
        values = {k: (Path(v) if k in paths else v) for k, v in data.items() if k in known}
        return cls(**values)


def default_run_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``MLOPS_RUN_DIR`` or ``<repo>/.run``."""
    from airmlops.settings import PROJECT_ROOT

    environ = os.environ if environ is None else environ
    return Path(environ.get("MLOPS_RUN_DIR") or PROJECT_ROOT / ".run").resolve()


def resolve_config(
    run_dir: Path | None = None,
    *,
    airflow_port: int | None = None,
    mlflow_port: int | None = None,
    log_server_port: int | None = None,
    dags_folder: Path | None = None,
    plugins_folder: Path | None = None,
    mlflow_artifacts_dir: Path | None = None,
    dags_paused_at_creation: bool | None = None,
    external_mlflow_uri: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> PlatformConfig:
    """The platform config: arguments, then ``MLOPS_*`` environment, then what the last ``up``
    recorded in the run dir, then defaults."""
    from airmlops.settings import PROJECT_ROOT, get_settings

    environ = os.environ if environ is None else environ
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(environ)
    recorded = load_recorded_config(run_dir)

    def pick(arg: Any, env_key: str, attr: str, default: Any, cast: Callable[[str], Any]) -> Any:
        if arg is not None:
            return arg
        if environ.get(env_key):
            try:
                return cast(environ[env_key])
            except ValueError as exc:
                raise PlatformError(f"{env_key}={environ[env_key]!r} is not valid") from exc
        if recorded is not None:
            return getattr(recorded, attr)
        return default

    def as_path(value: str) -> Path:
        return Path(value).expanduser().resolve()

    def as_bool(value: str) -> bool:
        return value.strip().lower() in ("1", "true", "yes", "on")

    config = PlatformConfig(
        run_dir=run_dir,
        airflow_port=pick(
            airflow_port, "MLOPS_AIRFLOW_PORT", "airflow_port", DEFAULT_AIRFLOW_PORT, int
        ),
        mlflow_port=pick(mlflow_port, "MLOPS_MLFLOW_PORT", "mlflow_port", DEFAULT_MLFLOW_PORT, int),
        log_server_port=pick(
            log_server_port,
            "MLOPS_AIRFLOW_LOG_SERVER_PORT",
            "log_server_port",
            DEFAULT_LOG_SERVER_PORT,
            int,
        ),
        dags_folder=pick(
            dags_folder, "MLOPS_AIRFLOW_DAGS_FOLDER", "dags_folder", PROJECT_ROOT / "dags", as_path
        ),
        plugins_folder=pick(
            plugins_folder,
            "MLOPS_AIRFLOW_PLUGINS_FOLDER",
            "plugins_folder",
            PROJECT_ROOT / "plugins",
            as_path,
        ),
        mlflow_artifacts_dir=pick(
            mlflow_artifacts_dir,
            "MLOPS_MLFLOW_ARTIFACTS_DIR",
            "mlflow_artifacts_dir",
            get_settings().data_root / "mlflow-artifacts",
            as_path,
        ),
        dags_paused_at_creation=pick(
            dags_paused_at_creation,
            "MLOPS_AIRFLOW_DAGS_PAUSED_AT_CREATION",
            "dags_paused_at_creation",
            False,
            as_bool,
        ),
        parallelism=pick(
            None, "MLOPS_AIRFLOW_PARALLELISM", "parallelism", DEFAULT_PARALLELISM, int
        ),
        external_mlflow_uri=pick(
            external_mlflow_uri, "MLOPS_EXTERNAL_MLFLOW_URI", "external_mlflow_uri", None, str
        ),
    )
    for port in (config.airflow_port, config.mlflow_port, config.log_server_port):
        if not 0 < port < 65536:
            raise PlatformError(f"invalid port {port}")
    return config


def load_recorded_config(run_dir: Path) -> PlatformConfig | None:
    """The config the last ``up`` in ``run_dir`` used, if any."""
    path = Path(run_dir) / "platform.json"
    try:
        return PlatformConfig.from_json(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Secrets (generated once, kept under the run dir with mode 0600, never in the repository)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformSecrets:
    """Keys every Airflow process must share, and the admin password of the simple auth manager."""

    jwt_secret: str
    api_secret_key: str
    fernet_key: str
    admin_password: str = field(repr=False)


def ensure_secrets(config: PlatformConfig) -> PlatformSecrets:
    """Read the platform's secrets, generating and storing any that are missing. Idempotent."""
    secrets_file = config.run_dir / "secrets.json"
    stored: dict[str, str] = {}
    if secrets_file.exists():
        stored = json.loads(secrets_file.read_text())
    wanted = {
        "jwt_secret": lambda: secrets.token_urlsafe(48),
        "api_secret_key": lambda: secrets.token_urlsafe(48),
        "fernet_key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
    }
    missing = {k: make() for k, make in wanted.items() if not stored.get(k)}
    if missing:
        stored.update(missing)
        _write_private(secrets_file, json.dumps(stored, indent=2) + "\n")

    passwords: dict[str, str] = {}
    if config.passwords_file.exists():
        passwords = json.loads(config.passwords_file.read_text() or "{}")
    if not passwords.get(ADMIN_USER):
        passwords[ADMIN_USER] = secrets.token_urlsafe(12)
        _write_private(config.passwords_file, json.dumps(passwords) + "\n")
    return PlatformSecrets(
        jwt_secret=stored["jwt_secret"],
        api_secret_key=stored["api_secret_key"],
        fernet_key=stored["fernet_key"],
        admin_password=passwords[ADMIN_USER],
    )


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Atomically write ``text`` to ``path`` with permissions ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` readable by the owner only."""
    _write_atomic(path, text, 0o600)


# --------------------------------------------------------------------------------------------
# Environments of the child processes
# --------------------------------------------------------------------------------------------


def _base_env(base_env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if base_env is None else base_env)
    no_proxy = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h]
    for host in (HOST, "localhost", "::1"):
        if host not in no_proxy:
            no_proxy.append(host)
    # Loopback traffic must never go through a proxy configured for the registries.
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def airflow_env(
    config: PlatformConfig,
    pg: PgHandle,
    platform_secrets: PlatformSecrets,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of every Airflow process (and so of every task): the whole config."""
    env = _base_env(base_env)
    env.update(
        {
            "AIRFLOW_HOME": str(config.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(config.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(config.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(config.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(config.dags_paused_at_creation),
            "AIRFLOW__CORE__FERNET_KEY": platform_secrets.fernet_key,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "airmlops.platform.loopback_hostname",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{config.airflow_url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(config.passwords_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.uri("airflow"),
            # A burst of API calls (webhooks, the UI, 20 concurrent triggers in the tests) must
            # not queue on the API server's connection pool: with Airflow's 5 + 10 connections
            # the 16th concurrent request waits, and on a busy 2-core machine 20 triggers once
            # took 31 s with one 500, the mark of SQLAlchemy's 30 s pool timeout. 5 + 25 per
            # process stays well below the embedded PostgreSQL's 100 connections.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "25",
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(config.airflow_port),
            "AIRFLOW__API__BASE_URL": config.airflow_url,
            "AIRFLOW__API__SECRET_KEY": platform_secrets.api_secret_key,
            "AIRFLOW__API_AUTH__JWT_SECRET": platform_secrets.jwt_secret,
            # Airflow's own log servers bind every interface; they are skipped and one log
            # server bound to 127.0.0.1 serves both worker and triggerer logs instead.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(config.log_server_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(config.log_server_port),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # Pick up a new DAG file within 30 s instead of 5 minutes.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "MLOPS_MLFLOW_TRACKING_URI": config.mlflow_url,
            "MLFLOW_TRACKING_URI": config.mlflow_url,
        }
    )
    return env


def mlflow_env(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the MLflow server: one process, no job runner (~0.6 GB, not ~4 GB)."""
    env = _base_env(base_env)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def _script(name: str) -> str:
    """A console script of the running environment (the venv's ``airflow``, ``mlflow``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PlatformError(f"`{name}` is not installed in this Python environment")
    return found


def component_argv(name: str, config: PlatformConfig, pg: PgHandle | None = None) -> list[str]:
    """The command line of component ``name``."""
    if name == MLFLOW:
        if pg is None:
            raise ValueError("the MLflow server needs the embedded PostgreSQL handle")
        return [
            _script("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(config.mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            pg.uri("mlflow"),
            # Clients log artifacts through the server (mlflow-artifacts:/), which stores them here.
            "--artifacts-destination",
            str(config.mlflow_artifacts_dir),
        ]
    airflow = _script("airflow")
    commands = {
        API_SERVER: [airflow, "api-server", "--host", HOST, "--port", str(config.airflow_port)],
        SCHEDULER: [airflow, "scheduler", "--skip-serve-logs"],
        DAG_PROCESSOR: [airflow, "dag-processor"],
        TRIGGERER: [airflow, "triggerer", "--skip-serve-logs"],
        LOG_SERVER: [
            sys.executable,
            "-m",
            "uvicorn",
            "airflow.utils.serve_logs.log_server:get_app",
            "--factory",
            "--host",
            HOST,
            "--port",
            str(config.log_server_port),
            "--no-access-log",
        ],
    }
    if name not in commands:
        raise ValueError(f"unknown component {name!r}")
    return commands[name]


# --------------------------------------------------------------------------------------------
# Processes: pidfiles, liveness, process groups
# --------------------------------------------------------------------------------------------


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
    ``logs/<name>.log`` and write its pidfile. The process outlives the caller."""
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
    _write_atomic(pidfile(run_dir, name), f"{record.pid}\n{record.create_time}\n")
    return record


def _group_members(pgid: int) -> list[int]:
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


def stop_components(
    run_dir: Path, names: Sequence[str], timeout: float = 10.0, progress: Progress | None = None
) -> list[str]:
    """SIGTERM the process groups of ``names``, wait up to ``timeout`` s, then SIGKILL what is
    left (the triggerer ignores SIGTERM for a while). Removes the pidfiles. Returns the names
    that had something running."""
    records = [r for r in (read_record(run_dir, n) for n in names) if r is not None]
    ours = [r for r in records if _group_is_ours(r)]
    running = [r for r in ours if is_alive(r) or _group_members(r.pid)]
    for record in running:
        _signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    pending = list(running)
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        for record in pending:
            reap(record.pid)
        pending = [r for r in pending if _group_members(r.pid)]
    for record in pending:
        if progress:
            progress(f"{record.name}: still running after {timeout:.0f} s, killing it")
        _signal_group(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pending and time.monotonic() < deadline:
        time.sleep(0.1)
        for record in pending:
            reap(record.pid)
        pending = [r for r in pending if _group_members(r.pid)]
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
    with _platform_lock(run_dir, progress):
        stopped = stop_components(run_dir, names, timeout=timeout, progress=progress)
        from airmlops.watchdog import stop_idle_orphans

        if stop_idle_orphans(run_dir, everything=True):  # what killed components left behind
            stopped.append("leftovers of restarted components")
        if stop_postgres(run_dir):
            stopped.append(POSTGRES)
    return stopped


@contextlib.contextmanager
def _platform_lock(run_dir: Path, progress: Progress | None = None) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# Readiness
# --------------------------------------------------------------------------------------------


def _port_in_use(port: int) -> bool:
    return not port_free(port)


def _http_client(timeout: float = 10.0):  # -> httpx.Client
    import httpx

    # trust_env=False: never route loopback calls through a proxy from the environment.
    return httpx.Client(timeout=timeout, trust_env=False)


def log_tail(run_dir: Path, name: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a component's log (for error messages)."""
    path = Path(run_dir) / "logs" / f"{name}.log"
    if not path.exists():
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n{file_tail(path, lines)}"


def airflow_health(base_url: str) -> dict[str, str] | None:
    """``{component: status}`` from ``/api/v2/monitor/health``; None if it does not answer."""
    import httpx

    try:
        with _http_client(5.0) as client:
            response = client.get(f"{base_url}/api/v2/monitor/health")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    body = response.json()
    return {key: str((body.get(key) or {}).get("status")) for key in HEALTH_KEYS}


def mlflow_ready(tracking_uri: str) -> bool:
    """True if the MLflow server answers ``/health``."""
    import httpx

    try:
        with _http_client(5.0) as client:
            return client.get(f"{tracking_uri.rstrip('/')}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _wait(
    what: str,
    check: Callable[[], tuple[bool, str]],
    *,
    timeout: float,
    run_dir: Path,
    watched: Sequence[str],
    progress: Progress,
    every: float = 5.0,
) -> float:
    """Poll ``check`` until it passes; fail early if a watched process dies. Returns seconds."""
    start = time.monotonic()
    last_report = start
    detail = ""
    while True:
        ok, detail = check()
        elapsed = time.monotonic() - start
        if ok:
            return elapsed
        for name in watched:
            if not is_alive(read_record(run_dir, name)):
                raise PlatformError(
                    f"{name} exited while waiting for {what}\n{log_tail(run_dir, name)}"
                )
        if elapsed > timeout:
            tails = "\n".join(log_tail(run_dir, n, 15) for n in watched)
            raise PlatformError(f"{what} not ready after {timeout:.0f} s ({detail})\n{tails}")
        if time.monotonic() - last_report >= every:
            progress(f"waiting for {what} ({elapsed:.0f} s): {detail}")
            last_report = time.monotonic()
        time.sleep(0.5)


def wait_mlflow(config: PlatformConfig, timeout: float = 120.0, progress: Progress = _say) -> float:
    """Wait until the platform's MLflow answers ``/health``. Returns the seconds waited."""
    watched = () if config.external_mlflow_uri else (MLFLOW,)
    return _wait(
        f"MLflow at {config.mlflow_url}",
        lambda: (mlflow_ready(config.mlflow_url), "not answering yet"),
        timeout=timeout,
        run_dir=config.run_dir,
        watched=watched,
        progress=progress,
    )


def wait_airflow_healthy(
    config: PlatformConfig, timeout: float = 240.0, progress: Progress = _say
) -> float:
    """Wait until every Airflow component reports healthy. Returns the seconds waited."""

    def check() -> tuple[bool, str]:
        health = airflow_health(config.airflow_url)
        if health is None:
            return False, "api-server not answering yet"
        unhealthy = {k: v for k, v in health.items() if v != "healthy"}
        return not unhealthy, ", ".join(f"{k}={v}" for k, v in unhealthy.items())

    return _wait(
        f"Airflow at {config.airflow_url}",
        check,
        timeout=timeout,
        run_dir=config.run_dir,
        watched=AIRFLOW_COMPONENTS,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# Bringing the platform up
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """A running platform: what a test or a caller needs to talk to it."""

    config: PlatformConfig
    pg: PgHandle
    username: str
    password: str = field(repr=False)
    env: dict[str, str] = field(repr=False)
    started: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.config.airflow_url

    @property
    def mlflow_url(self) -> str:
        return self.config.mlflow_url

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


def start_mlflow(
    config: PlatformConfig, pg: PgHandle, base_env: Mapping[str, str] | None = None
) -> ProcessRecord:
    """Start the MLflow tracking server of ``config`` (does not wait; see :func:`wait_mlflow`)."""
    if _port_in_use(config.mlflow_port):
        raise PlatformError(
            f"port {config.mlflow_port} on {HOST} is taken by another program; "
            "choose another with MLOPS_MLFLOW_PORT or --mlflow-port"
        )
    config.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    return spawn(config.run_dir, MLFLOW, component_argv(MLFLOW, config, pg), mlflow_env(base_env))


def migrate_airflow_db(
    config: PlatformConfig, env: Mapping[str, str], timeout: float = 300.0
) -> float:
    """``airflow db migrate`` (idempotent). Returns the seconds it took."""
    log_path = config.logs_dir / "airflow-db-migrate.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "ab") as log:
        result = subprocess.run(
            [_script("airflow"), "db", "migrate"],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise PlatformError(
            f"`airflow db migrate` failed (exit {result.returncode})\n"
            f"{log_tail(config.run_dir, 'airflow-db-migrate')}"
        )
    return time.monotonic() - start


def start_airflow(
    config: PlatformConfig, env: Mapping[str, str], names: Sequence[str] = AIRFLOW_COMPONENTS
) -> list[ProcessRecord]:
    """Start the given Airflow components (does not wait; see :func:`wait_airflow_healthy`)."""
    ports = {API_SERVER: config.airflow_port, LOG_SERVER: config.log_server_port}
    for name in names:
        if name in ports and _port_in_use(ports[name]):
            raise PlatformError(
                f"port {ports[name]} on {HOST} ({name}) is taken by another program; choose "
                "another with MLOPS_AIRFLOW_PORT / MLOPS_AIRFLOW_LOG_SERVER_PORT or the flags"
            )
    config.airflow_home.mkdir(parents=True, exist_ok=True)
    return [spawn(config.run_dir, name, component_argv(name, config), env) for name in names]


def start_platform(
    config: PlatformConfig,
    *,
    timeout: float = 300.0,
    progress: Progress = _say,
    base_env: Mapping[str, str] | None = None,
) -> Platform:
    """Bring the platform of ``config`` up, reusing whatever already runs, and wait until healthy.

    Idempotent: components alive in the run dir are kept (a second call starts nothing).
    """
    t0 = time.monotonic()
    run_dir = config.run_dir
    with _platform_lock(run_dir, progress):
        recorded = load_recorded_config(run_dir)
        alive = {n for n in (MLFLOW, *AIRFLOW_COMPONENTS) if is_alive(read_record(run_dir, n))}
        if alive and recorded is not None and recorded != config:
            progress(
                f"{', '.join(sorted(alive))} already running with the recorded settings of "
                f"{run_dir}; keeping those (run `down` first to change them)"
            )
            config = recorded
        config.logs_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / "platform.json", json.dumps(config.to_json(), indent=2) + "\n")

        timings: dict[str, float] = {}
        started: list[str] = []
        t = time.monotonic()
        was_running = running_postgres(run_dir) is not None
        pg = start_postgres(run_dir)
        timings["postgres"] = time.monotonic() - t
        progress(
            f"postgres: {'already running' if was_running else 'started'} "
            f"(pid {pg.pid}, socket {pg.socket_dir})"
        )
        platform_secrets = ensure_secrets(config)
        env = airflow_env(config, pg, platform_secrets, base_env)

        if not config.external_mlflow_uri:
            if MLFLOW in alive:
                progress(f"mlflow: already running (pid {read_record(run_dir, MLFLOW).pid})")
            else:
                record = start_mlflow(config, pg, base_env)
                started.append(MLFLOW)
                progress(f"mlflow: starting (pid {record.pid})")

        missing = [n for n in AIRFLOW_COMPONENTS if n not in alive]
        if missing:
            progress("airflow: migrating the metadata database")
            timings["airflow db migrate"] = migrate_airflow_db(config, env)
            for record in start_airflow(config, env, missing):
                progress(f"airflow {record.name}: starting (pid {record.pid})")
            started.extend(missing)
        for name in AIRFLOW_COMPONENTS:
            if name in alive:
                progress(f"airflow {name}: already running (pid {read_record(run_dir, name).pid})")

        remaining = max(30.0, timeout - (time.monotonic() - t0))
        wait_mlflow(config, remaining, progress)
        timings["mlflow ready"] = time.monotonic() - t0
        remaining = max(30.0, timeout - (time.monotonic() - t0))
        wait_airflow_healthy(config, remaining, progress)
        timings["airflow healthy"] = time.monotonic() - t0
        from airmlops.watchdog import start_watchdog

        watchdog_alive = is_alive(read_record(run_dir, WATCHDOG))
        record = start_watchdog(run_dir, base_env)
        if not watchdog_alive:
            started.append(WATCHDOG)
        progress(f"watchdog: {'already running' if watchdog_alive else 'started'} "
                 f"(pid {record.pid}; restarts what dies)")
    return Platform(
        config=config,
        pg=pg,
        username=ADMIN_USER,
        password=platform_secrets.admin_password,
        env=env,
        started=tuple(started),
        timings=timings,
    )


# --------------------------------------------------------------------------------------------
# The Airflow REST API: token, DAGs, runs
# --------------------------------------------------------------------------------------------


def _check_dag_id(dag_id: str) -> str:
    if not _DAG_ID.fullmatch(dag_id):
        raise ValueError(f"invalid dag_id {dag_id!r}")
    return quote(dag_id, safe="")


def _raise_for(response: Any, what: str) -> None:
    if response.status_code >= 400:
        raise PlatformError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")


def api_token(base_url: str, username: str, password: str) -> str:
    """A JWT for the REST API from ``POST /auth/token`` (simple auth manager)."""
    with _http_client() as client:
        response = client.post(
            f"{base_url}/auth/token", json={"username": username, "password": password}
        )
    _raise_for(response, "POST /auth/token")
    return response.json()["access_token"]


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get_dag(base_url: str, token: str, dag_id: str) -> dict[str, Any] | None:
    """The DAG's REST representation, or None while it is not parsed yet."""
    with _http_client() as client:
        response = client.get(
            f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}", headers=_headers(token)
        )
    if response.status_code == 404:
        return None
    _raise_for(response, f"GET dag {dag_id}")
    return response.json()


def import_errors(base_url: str, token: str) -> list[dict[str, Any]]:
    """DAG files that failed to import, as the DAG processor reported them."""
    with _http_client() as client:
        response = client.get(f"{base_url}/api/v2/importErrors", headers=_headers(token))
    _raise_for(response, "GET importErrors")
    return response.json().get("import_errors", [])


def wait_for_dag(
    base_url: str, token: str, dag_id: str, timeout: float = 180.0, progress: Progress = _say
) -> dict[str, Any]:
    """Wait until the DAG processor has parsed ``dag_id``; shows import errors while waiting."""
    start = time.monotonic()
    last_report = start
    reported: set[str] = set()
    while True:
        dag = get_dag(base_url, token, dag_id)
        if dag is not None:
            return dag
        for error in import_errors(base_url, token):
            key = f"{error.get('filename')}:{error.get('timestamp')}"
            if key not in reported:
                reported.add(key)
                progress(f"import error in {error.get('filename')}:\n{error.get('stack_trace')}")
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise PlatformError(
                f"DAG {dag_id!r} not found after {timeout:.0f} s; is it in the dags folder, "
                "and does its file import? (see the import errors above, if any)"
            )
        if time.monotonic() - last_report >= 10:
            progress(f"waiting for DAG {dag_id} to be parsed ({elapsed:.0f} s)")
            last_report = time.monotonic()
        time.sleep(1.0)


def set_dag_paused(base_url: str, token: str, dag_id: str, paused: bool) -> dict[str, Any]:
    """Pause or unpause a DAG."""
    with _http_client() as client:
        response = client.patch(
            f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}",
            headers=_headers(token),
            json={"is_paused": paused},
        )
    _raise_for(response, f"PATCH dag {dag_id}")
    return response.json()


def trigger_dag(
    base_url: str,
    token: str,
    dag_id: str,
    conf: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Trigger a run (``logical_date`` null: a manual run not tied to a data interval).

    Raises :class:`PlatformError` on any non-2xx answer (409: that run id exists).
    """
    body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
    if run_id is not None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        body["dag_run_id"] = run_id
    with _http_client(30.0) as client:
        response = client.post(
            f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}/dagRuns",
            headers=_headers(token),
            json=body,
        )
    _raise_for(response, f"trigger {dag_id}")
    return response.json()


def run_url(base_url: str, dag_id: str, run_id: str) -> str:
    """The UI page of a DAG run."""
    return f"{base_url}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe=':+')}"


def follow_dag_run(
    base_url: str,
    token: str,
    dag_id: str,
    run_id: str,
    *,
    poll: float = 2.0,
    timeout: float | None = None,
    progress: Progress = _say,
) -> str:
    """Follow a run to its end, reporting each task state change. Returns the final run state."""
    dag_path = f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}/dagRuns/{quote(run_id, safe='')}"
    seen: dict[tuple[str, int], str] = {}
    start = time.monotonic()
    with _http_client() as client:
        while True:
            run = client.get(dag_path, headers=_headers(token))
            _raise_for(run, f"GET run {run_id}")
            tasks = client.get(
                f"{dag_path}/taskInstances", headers=_headers(token), params={"limit": 1000}
            )
            _raise_for(tasks, f"GET task instances of {run_id}")
            for ti in tasks.json().get("task_instances", []):
                key = (ti["task_id"], ti.get("map_index", -1))
                state = ti.get("state") or "none"
                if seen.get(key) != state:
                    seen[key] = state
                    label = ti["task_id"] if key[1] < 0 else f"{ti['task_id']}[{key[1]}]"
                    if state != "none":
                        progress(f"  {label}: {state}")
            state = run.json().get("state")
            if state in _TERMINAL_RUN_STATES:
                return state
            if timeout is not None and time.monotonic() - start > timeout:
                raise PlatformError(f"run {run_id} still {state} after {timeout:.0f} s")
            time.sleep(poll)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _print_summary(platform: Platform) -> None:
    config = platform.config
    print(
        "\n"
        f"  Airflow UI   {config.airflow_url}    login: {platform.username} / {platform.password}\n"
        f"  MLflow UI    {config.mlflow_url}\n"
        f"  Logs         {config.logs_dir}  (task logs: {config.airflow_home / 'logs'})\n"
        f"  Password     stored in {config.passwords_file}\n"
        f"  Stop         make stop"
        f"  (or: python -m airmlops.platform down --run-dir {config.run_dir})\n",
        flush=True,
    )


def _cmd_up(args: argparse.Namespace) -> int:
    config = resolve_config(
        args.run_dir,
        airflow_port=args.airflow_port,
        mlflow_port=args.mlflow_port,
        log_server_port=args.log_server_port,
        dags_folder=args.dags_folder,
        plugins_folder=args.plugins_folder,
        dags_paused_at_creation=args.dags_paused,
        external_mlflow_uri=args.mlflow_uri,
    )
    if args.trigger and not _DAG_ID.fullmatch(args.trigger):
        raise PlatformError(f"invalid DAG id {args.trigger!r}: expected {_DAG_ID.pattern}")
    try:
        conf = json.loads(args.conf) if args.conf else None
    except json.JSONDecodeError as exc:
        raise PlatformError(f"--conf is not valid JSON: {exc}") from exc
    if conf is not None and not isinstance(conf, dict):
        raise PlatformError("--conf must be a JSON object")
    _say(f"run dir {config.run_dir}")
    try:
        platform = start_platform(config, timeout=args.timeout)
    except PlatformError as exc:
        raise PlatformError(
            f"{exc}\nWhat did start keeps running for inspection; stop it with "
            f"`python -m airmlops.platform down --run-dir {config.run_dir}` (or `make stop`)."
        ) from exc
    took = ", ".join(f"{k} {v:.1f} s" for k, v in platform.timings.items())
    what = f"started {', '.join(platform.started)}" if platform.started else "all reused"
    _say(f"ready ({what}; {took})")
    _print_summary(platform)
    if not args.trigger:
        return 0

    token = api_token(platform.base_url, platform.username, platform.password)
    wait_for_dag(platform.base_url, token, args.trigger, timeout=args.timeout)
    set_dag_paused(platform.base_url, token, args.trigger, paused=False)
    run = trigger_dag(platform.base_url, token, args.trigger, conf=conf)
    run_id = run["dag_run_id"]
    _say(f"triggered {args.trigger} run {run_id}")
    _say(f"follow it at {run_url(platform.base_url, args.trigger, run_id)}")
    if not args.wait:
        return 0
    try:
        state = follow_dag_run(platform.base_url, token, args.trigger, run_id)
    except KeyboardInterrupt:
        _say("stopped following; the run goes on (the platform keeps running)")
        return 130
    _say(f"run {run_id} finished: {state}")
    if state != "success":
        _say(f"task logs: {run_url(platform.base_url, args.trigger, run_id)}")
        return 1
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir()
    stopped = stop_all(run_dir, timeout=args.timeout, progress=_say)
    stopped += stop_deployments(timeout=args.timeout)
    _say(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running in {run_dir}")
    return 0


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


def _cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir()
    status = component_status(run_dir)
    recorded = load_recorded_config(run_dir)
    health = (
        airflow_health(recorded.airflow_url)
        if recorded and status.get(API_SERVER, {}).get("alive")
        else None
    )
    if args.json:
        print(
            json.dumps(
                {
                    "run_dir": str(run_dir),
                    "components": status,
                    "airflow_url": recorded.airflow_url if recorded else None,
                    "mlflow_url": recorded.mlflow_url if recorded else None,
                    "airflow_health": health,
                },
                indent=2,
            )
        )
        return 0
    print(f"run dir {run_dir}")
    for name, info in status.items():
        state = f"alive (pid {info['pid']})" if info["alive"] else "not running"
        print(f"  {name:<14} {state}")
    if recorded:
        print(f"  Airflow UI     {recorded.airflow_url}")
        print(f"  MLflow UI      {recorded.mlflow_url}")
        print(f"  Logs           {recorded.logs_dir}")
    if health:
        print("  Airflow health " + ", ".join(f"{k}={v}" for k, v in health.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m airmlops.platform`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="runtime state (pidfiles, logs, database); default MLOPS_RUN_DIR or <repo>/.run",
    )
    parser = argparse.ArgumentParser(
        prog="python -m airmlops.platform",
        description="Start, stop and inspect the embedded platform (PostgreSQL, MLflow, Airflow).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start (or reuse) every component")
    up.add_argument(
        "--airflow-port", type=int, help=f"default MLOPS_AIRFLOW_PORT or {DEFAULT_AIRFLOW_PORT}"
    )
    up.add_argument(
        "--mlflow-port", type=int, help=f"default MLOPS_MLFLOW_PORT or {DEFAULT_MLFLOW_PORT}"
    )
    up.add_argument(
        "--log-server-port", type=int, help=f"task-log server; default {DEFAULT_LOG_SERVER_PORT}"
    )
    up.add_argument(
        "--dags-folder", type=Path, help="default MLOPS_AIRFLOW_DAGS_FOLDER or <repo>/dags"
    )
    up.add_argument("--plugins-folder", type=Path, help="default <repo>/plugins")
    up.add_argument("--mlflow-uri", help="use this MLflow server instead of starting one")
    up.add_argument(
        "--dags-paused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether new DAGs start paused (default: not paused)",
    )
    up.add_argument("--trigger", metavar="DAG_ID", help="unpause and trigger this DAG once up")
    up.add_argument("--conf", help="JSON object passed as the triggered run's conf")
    up.add_argument("--wait", action="store_true", help="follow the triggered run to its end")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", parents=[common], help="stop every component")
    down.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    down.set_defaults(func=_cmd_down)

    status = sub.add_parser("status", parents=[common], help="show which components are alive")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m airmlops.platform``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PlatformError as exc:
        print(f"[platform] error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        _say("interrupted; components already started keep running (stop them with `down`)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
