"""Least privilege for the processes the platform starts for serving (issue 13, point 5).

Attack: a model service or the stable-address proxy runs code someone else wrote (a model, a
dependency); whatever is in its environment is theirs, and so is any unauthenticated control
port of its process manager. Here a real blue/green deploy through the ``process`` target
(:func:`airmlops.serving.deploy.deploy`, the tiny BentoML service of
``tests/integration/fixtures/versioned_service``) runs with secret-looking values planted in the
deploying process's environment; every process of the slot's tree and of the proxy's tree must
start without any of them, and the slot's only TCP socket must be its HTTP port (BentoML's
circus arbiter binds its control and pub/sub endpoints on private unix sockets instead).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from airmlops.processes import free_port
from airmlops.serving import deploy as deploy_mod

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "integration" / "fixtures" / "versioned_service"
V1 = "versioned_service:v1-ok"
GOLDEN = [{"x": 1.0}, {"x": -2.5}]
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
PIPELINE = "least_privilege"
SERVING_TOKEN = f"serving-token-{secrets.token_hex(8)}"

PLANTED_NAMES = (
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW_CONN_WAREHOUSE",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "DATABASE_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_PASSWORD",
    "MLOPS_MLFLOW_TRACKING_URI",
    "MLOPS_GITHUB_WEBHOOK_SECRET",
    "MLOPS_GITLAB_WEBHOOK_TOKEN",
    "MLOPS_SERVING_DB_PASSWORD",
    "MLOPS_PROXY_ADMIN_PASSWORD",
)
"""Secrets of the worker (Airflow, its database, clouds, MLflow, webhooks) and secret-looking
names under the prefixes a service or the proxy may otherwise read."""


def _planted_value(name: str) -> str:
    marker = f"planted-{name.lower()}-{secrets.token_hex(6)}"
    if name.endswith(("_URI", "_URL", "_CONN", "WAREHOUSE")):
        return f"postgresql://admin:{marker}@127.0.0.1:5432/airflow"
    return marker


def _build_v1(home: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run(
        [sys.executable, str(FIXTURE / "build_bento.py"), "1:ok"],
        env=env, cwd=str(home), capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.split() == [V1]


def _tree(pid: int, marker: tuple[str, str] | None = None) -> list[psutil.Process]:
    """A started process, its descendants, and anything carrying its marker."""
    leader = psutil.Process(pid)
    procs = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
    if marker is not None:
        procs.update({p.pid: p for p in deploy_mod.marked_processes(*marker)})
    return list(procs.values())


def _environ(proc: psutil.Process) -> bytes:
    return Path(f"/proc/{proc.pid}/environ").read_bytes()


class Deployment:
    """The running deployment: its root, state, the planted secrets and the process trees."""

    def __init__(self, root: Path, planted: dict[str, str]) -> None:
        self.root, self.planted = root, planted
        self.state = deploy_mod.load_state(PIPELINE, root)
        self.slot = self.state["slots"][self.state["active"]]
        self.proxy = self.state["proxy"]

    def processes(self, kind: str) -> list[psutil.Process]:
        if kind == "model-service slot":
            marker = (deploy_mod.INSTANCE_MARKER, self.slot["instance"])
            return _tree(self.slot["pid"], marker)
        if kind == "supervisor":
            return _tree(self.state["supervisor"]["pid"])
        return _tree(self.proxy["pid"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """V1 deployed (proxy + blue slot) by a process whose environment holds the planted secrets."""
    home = tmp_path_factory.mktemp("bentoml-home")
    root = tmp_path_factory.mktemp("deploy-root")
    _build_v1(home)
    planted = {name: _planted_value(name) for name in (*PLANTED_NAMES, ALERT_SECRET)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in planted.items():
            patch.setenv(name, value)
        try:
            deploy_mod.deploy(
                PIPELINE, "1", V1, "process", GOLDEN,
                root=root, proxy_port=free_port(), ready_timeout=60.0,
                latency_budget_ms=2000.0, now=NOW, bentoml_home=home,
                env={"MLOPS_SERVING_TOKEN": SERVING_TOKEN, "MLOPS_DATA_ROOT": str(root)},
                validate=lambda request, body: body.get("version") == "1",
            )
            yield Deployment(root, planted)
        finally:
            deploy_mod.undeploy(PIPELINE, root)


KINDS = ("model-service slot", "proxy", "supervisor")
SERVERS = ("model-service slot", "proxy")
ALERT_SECRET = "MLOPS_ALERT_WEBHOOK_AUTH"
"""An alert channel's credential: the supervisor sends alerts, no server may hold it."""


def test_every_process_of_each_tree_is_read(deployment: Deployment) -> None:
    """The reading below is real: each tree's processes carry the deployment marker, the slot
    (an arbiter and its worker) also the token it was given on purpose."""
    marker = f"{deploy_mod.DEPLOYMENT_MARKER}={deployment.state['deployment_id']}".encode()
    slot = deployment.processes("model-service slot")
    assert len(slot) >= 2, [p.cmdline() for p in slot]
    for proc in slot:
        environ = _environ(proc)
        assert marker in environ and f"MLOPS_SERVING_TOKEN={SERVING_TOKEN}".encode() in environ
    for proc in deployment.processes("proxy"):
        environ = _environ(proc)
        assert marker in environ and SERVING_TOKEN.encode() not in environ
    for proc in deployment.processes("supervisor"):  # it restarts slots: it holds their env
        environ = _environ(proc)
        assert marker in environ and f"MLOPS_SERVING_TOKEN={SERVING_TOKEN}".encode() in environ


def test_only_the_supervisor_holds_the_alert_credentials(deployment: Deployment) -> None:
    value = deployment.planted[ALERT_SECRET].encode()
    assert all(value in _environ(p) for p in deployment.processes("supervisor"))
    for kind in SERVERS:
        for proc in deployment.processes(kind):
            assert value not in _environ(proc), (kind, proc.cmdline())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PLANTED_NAMES)
def test_planted_secret_reaches_no_serving_process(
    deployment: Deployment, kind: str, name: str
) -> None:
    value = deployment.planted[name]
    assert os.environ[name] == value  # the deploying process does hold it
    procs = deployment.processes(kind)
    assert procs
    for proc in procs:
        environ = _environ(proc)
        names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0") if entry}
        assert value.encode() not in environ, (proc.pid, proc.cmdline(), name)
        assert name.encode() not in names, (proc.pid, proc.cmdline(), name)


@pytest.mark.parametrize(
    "name",
    [
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AWS_SECRET_ACCESS_KEY",
        "MLOPS_MLFLOW_TRACKING_URI",
        "MLOPS_SERVING_DB_PASSWORD",
        "PYTHONPATH",
        "LD_PRELOAD",
    ],
)
def test_deploy_refuses_to_hand_a_service_a_variable_it_must_not_have(
    tmp_path: Path, name: str
) -> None:
    value = f"handed-{secrets.token_hex(8)}"
    with pytest.raises(ValueError, match=f"environment variable {name} may not be passed"):
        deploy_mod.deploy(
            PIPELINE, "1", V1, "process", GOLDEN,
            root=tmp_path, proxy_port=free_port(), ready_timeout=5.0,
            latency_budget_ms=1000.0, now=NOW, env={name: value},
        )
    assert not deploy_mod.deployment_dir(PIPELINE, tmp_path).exists()  # nothing was started
    for proc in psutil.process_iter():
        try:
            assert value.encode() not in _environ(proc)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue


def _inet_sockets(procs: list[psutil.Process], kind: str) -> list[Any]:
    pids = {p.pid for p in procs}
    return [c for c in psutil.net_connections(kind=kind) if c.pid in pids]


def test_the_supervisor_listens_on_nothing(deployment: Deployment) -> None:
    procs = deployment.processes("supervisor")
    assert procs
    assert [c for c in _inet_sockets(procs, "tcp") if c.status == psutil.CONN_LISTEN] == []
    assert _inet_sockets(procs, "udp") == []


@pytest.mark.parametrize("kind", SERVERS)
def test_the_only_listening_tcp_socket_is_the_http_port(deployment: Deployment, kind: str) -> None:
    record = deployment.slot if kind == "model-service slot" else deployment.proxy
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in _inet_sockets(deployment.processes(kind), "tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", record["port"])}


@pytest.mark.parametrize("kind", KINDS)
def test_no_udp_socket_is_bound(deployment: Deployment, kind: str) -> None:
    assert _inet_sockets(deployment.processes(kind), "udp") == []


@pytest.mark.parametrize("kind", SERVERS)
def test_no_other_local_port_of_the_tree_accepts_a_connection(
    deployment: Deployment, kind: str
) -> None:
    record = deployment.slot if kind == "model-service slot" else deployment.proxy
    other_ports = {
        c.laddr.port
        for c in _inet_sockets(deployment.processes(kind), "inet")
        if c.laddr and c.laddr.port != record["port"]
    }
    for port in other_ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            assert sock.connect_ex(("127.0.0.1", port)) != 0, port


def test_process_manager_control_endpoint_is_a_private_unix_socket(
    deployment: Deployment,
) -> None:
    """circus's control and pub/sub endpoints: unix sockets in a folder only we may enter."""
    arbiter = psutil.Process(deployment.slot["pid"])
    paths = {c.laddr for c in arbiter.net_connections(kind="unix") if c.laddr}
    endpoints = {Path(p) for p in paths if Path(p).name in ("control.sock", "pubsub.sock")}
    assert {p.name for p in endpoints} == {"control.sock", "pubsub.sock"}, paths
    for endpoint in endpoints:
        folder = endpoint.parent.stat()
        assert stat.S_IMODE(folder.st_mode) == 0o700, endpoint
        assert folder.st_uid == os.getuid()
