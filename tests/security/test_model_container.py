"""A model container started the way the docker deploy target starts it, attacked from inside.

The echo bento (tests/integration/fixtures/echo_service) is built into a real image on the local
engine (``docker_engine_ready``: scripts/ensure-docker.sh and ensure-base-image.sh) and started
with :func:`airmlops.serving.deploy.start_slot` (target ``docker``) with small
``deploy.resources``. ``docker inspect`` must show the confinement (no capabilities,
``no-new-privileges``, not privileged, a non-root user, a read-only root filesystem, memory,
CPU and pids limits, the host network with the server on 127.0.0.1), the service must still
become ready and answer, and each attack run inside the container must be refused and leave
nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from airmlops.platform import free_port
from airmlops.serving.container import ContainerResources, build_image
from airmlops.serving.deploy import SlotHandle, start_slot, stop_slot, wait_ready
from airmlops.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration

BASE_IMAGE = os.environ.get("MLOPS_BASE_IMAGE", "airmlops/python:3.11-bookworm")
WHEELHOUSE = PROJECT_ROOT / ".data" / "wheelhouse"  # the cache the container tests share
FIXTURE = PROJECT_ROOT / "tests" / "integration" / "fixtures" / "echo_service"
IMAGE_TAG = "airmlops-test/echo-service:security"
RESOURCES = ContainerResources(memory_mb=384, cpus=0.5, pids=200)


@pytest.fixture(scope="module")
def echo_image(docker_engine_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The echo bento as an image, built like the containerize stage builds model images."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run(
        [sys.executable, str(FIXTURE / "build_bento.py"), str(tmp_path_factory.mktemp("export"))],
        env=env, cwd=str(home), capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    archive = Path(built.stdout.strip().splitlines()[-1])
    return build_image(archive, IMAGE_TAG, BASE_IMAGE, WHEELHOUSE).tag


@pytest.fixture(scope="module")
def model_slot(echo_image: str, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[SlotHandle, dict]]:
    """The image started by the docker target, ready; its ``docker inspect`` record."""
    port = free_port()
    handle = start_slot("docker", echo_image, port, {"MLOPS_DATA_ROOT": "/opt/airmlops/data"},
                        name=f"security-echo-{port}", log_dir=tmp_path_factory.mktemp("logs"),
                        resources=RESOURCES)
    try:
        wait_ready(handle.upstream, 180)
        yield handle, inspect(handle.container_id or "")
    finally:
        stop_slot(handle, timeout=5)


def inspect(container_id: str) -> dict:
    out = subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return json.loads(out)[0]


def docker_exec(container_id: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` inside the container, as its own user (never ``--user 0``/``--privileged``)."""
    return subprocess.run(["docker", "exec", container_id, *argv], capture_output=True,
                          text=True, timeout=60, check=False)


def test_container_is_confined_and_limited_as_inspected(model_slot):
    handle, record = model_slot
    host = record["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    assert host["Memory"] == RESOURCES.memory_mb * 2**20
    assert host["MemorySwap"] == host["Memory"]  # no swap beyond the limit
    assert host["NanoCpus"] == round(RESOURCES.cpus * 1e9)
    assert host["PidsLimit"] == RESOURCES.pids
    assert host["NetworkMode"] == "host"
    user = record["Config"]["User"]
    assert user and user.split(":")[0] not in ("0", "root"), user
    assert handle.resources == RESOURCES.to_dict()  # recorded: a rollback restarts it the same
    # Still serves, on the host's loopback only.
    env = dict(item.split("=", 1) for item in record["Config"]["Env"])
    assert env["BENTOML_HOST"] == "127.0.0.1"
    assert httpx.get(f"{handle.upstream}/readyz", trust_env=False, timeout=30).status_code == 200


def test_service_process_holds_no_capability_and_cannot_gain_privileges(model_slot):
    handle, _ = model_slot
    status = docker_exec(handle.container_id or "", "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split()[0] == "10001", fields["Uid"]
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capability_set].strip(), 16) == 0, (capability_set, fields)
    assert fields["NoNewPrivs"].strip() == "1"


def test_the_only_tcp_port_of_the_container_is_the_http_port(model_slot):
    """circus's control and pub/sub endpoints are private unix sockets (slot_server), not TCP
    ports that anyone on the host network could drive."""
    handle, _ = model_slot
    top = subprocess.run(["docker", "top", handle.container_id or "", "-eo", "pid"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    pids = {int(line) for line in top.split()[1:]}
    assert len(pids) >= 2, top  # the arbiter and at least one worker
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                 if c.pid in pids and c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", handle.port)}
    sockets = docker_exec(handle.container_id or "", "sh", "-c",
                          "ls /tmp/airmlops-circus-*/").stdout.split()
    assert sorted(sockets) == ["control.sock", "pubsub.sock"]


ATTACKS = {
    "write-the-root-filesystem": (
        ["sh", "-c", "echo owned > /home/bentoml/bento/owned"], "/home/bentoml/bento/owned"),
    "replace-the-service-code": (
        ["sh", "-c", "echo 'import os' >> /home/bentoml/bento/src/service.py"], None),
    "plant-a-binary-on-the-path": (
        ["sh", "-c", "cp /bin/sh /opt/venv/bin/owned"], "/opt/venv/bin/owned"),
    "run-a-program-from-scratch-space": (
        ["sh", "-c", "cp /bin/true /tmp/run-me && /tmp/run-me"], None),
    "become-root-with-setuid-su": (["su", "-c", "touch /root-was-here", "root"], "/root-was-here"),
    "change-file-ownership": (["chown", "10001", "/etc/passwd"], None),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS), ids=str)
def test_attack_from_inside_the_container_is_refused(model_slot, attack: str):
    handle, _ = model_slot
    container = handle.container_id or ""
    argv, planted = ATTACKS[attack]
    service_before = docker_exec(container, "sha256sum", "/home/bentoml/bento/src/service.py")
    assert service_before.returncode == 0, service_before.stderr
    passwd_before = docker_exec(container, "stat", "-c", "%u:%g", "/etc/passwd").stdout
    result = docker_exec(container, *argv)
    assert result.returncode != 0, f"{attack} succeeded: {result.stdout} {result.stderr}"
    if planted:
        assert docker_exec(container, "test", "-e", planted).returncode != 0, f"{planted} exists"
    service_after = docker_exec(container, "sha256sum", "/home/bentoml/bento/src/service.py")
    assert service_after.stdout == service_before.stdout
    assert docker_exec(container, "stat", "-c", "%u:%g", "/etc/passwd").stdout == passwd_before
    # The service is untouched and still answers.
    assert httpx.get(f"{handle.upstream}/readyz", trust_env=False, timeout=30).status_code == 200
