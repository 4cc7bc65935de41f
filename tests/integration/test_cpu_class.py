"""The shadow's idle CPU class on real processes: a process tree is put in it and taken out
again (a cgroup of its own with ``cpu.idle`` where the cgroup tree is writable, else the
SCHED_IDLE policy), and a process it forks meanwhile inherits it. Its refusals are in
tests/security/test_cpu_class_refusals.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from airmlops.serving import cpu_class
from airmlops.serving.deploy.state import SlotHandle

pytestmark = pytest.mark.integration

# A parent with one child at once; one more child per line read on stdin.
TREE = """
import subprocess, sys
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])]
print("ready", flush=True)
for line in sys.stdin:
    children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
    print("forked", flush=True)
"""


@pytest.fixture
def tree() -> Iterator[subprocess.Popen]:
    """A running process tree: a parent and one child."""
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
    proc.wait(timeout=10)


def pids(proc: subprocess.Popen) -> list[int]:
    root = psutil.Process(proc.pid)
    return [root.pid, *(child.pid for child in root.children(recursive=True))]


def fork_one(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("fork\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "forked"


def threads_idle(pid: int) -> list[bool]:
    return [os.sched_getscheduler(int(tid)) == os.SCHED_IDLE
            for tid in os.listdir(f"/proc/{pid}/task")]


def handle_of(proc: subprocess.Popen) -> SlotHandle:
    return SlotHandle(target="process", artifact="svc:1", port=40000, instance="test",
                      pid=proc.pid)


def test_a_process_tree_goes_into_the_idle_class_and_back_out(tree: subprocess.Popen) -> None:
    before = pids(tree)
    assert len(before) == 2 and not any(cpu_class.is_idle(pid) for pid in before)
    record = cpu_class.yield_cpu(handle_of(tree), "churn-green-40000")
    # The project's machines run as root on a writable cgroup tree: the cgroup way is taken.
    assert record["how"] == "cgroup", record
    group = Path(record["group"])
    assert group.name == "churn-green-40000" and (group / "cpu.idle").read_text().strip() == "1"
    assert all(cpu_class.is_idle(pid) for pid in before)
    assert sorted(int(p) for p in (group / "cgroup.procs").read_text().split()) == sorted(before)
    fork_one(tree)  # a server restarting a worker: the new one is in the class too
    after = pids(tree)
    assert len(after) == 3 and all(cpu_class.is_idle(pid) for pid in after)

    cpu_class.reclaim_cpu(handle_of(tree), record)
    assert not any(cpu_class.is_idle(pid) for pid in after)
    assert not group.exists()


def test_without_a_cgroup_every_thread_gets_sched_idle_and_back(
        tree: subprocess.Popen, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_class, "_cpu_root", lambda: None)  # a machine with no cgroup tree
    record = cpu_class.yield_cpu(handle_of(tree), "churn-green-40000")
    assert record == {"how": "sched-idle"}
    for pid in pids(tree):
        assert all(threads_idle(pid)) and cpu_class.is_idle(pid)
        assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == "19"
    fork_one(tree)
    assert all(cpu_class.is_idle(pid) for pid in pids(tree))

    cpu_class.reclaim_cpu(handle_of(tree), record)
    for pid in pids(tree):
        assert not any(threads_idle(pid)) and not cpu_class.is_idle(pid)
        assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == "0"


def test_a_cgroup_gone_while_its_processes_live_fails_the_reclaim(
        tree: subprocess.Popen) -> None:
    record = cpu_class.yield_cpu(handle_of(tree), "churn-green-40001")
    group = Path(record["group"])
    home = Path(record["home"])
    for pid in (group / "cgroup.procs").read_text().split():
        (home / "cgroup.procs").write_text(pid)
    group.rmdir()  # someone else emptied and removed it: the class cannot be vouched for
    with pytest.raises(OSError, match="is gone"):
        cpu_class.reclaim_cpu(handle_of(tree), record)


def test_a_machine_that_cannot_gives_none_and_the_reason(
        tree: subprocess.Popen, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_class, "_cpu_root", lambda: None)
    monkeypatch.setattr(cpu_class, "_may_raise_policy", lambda: False)  # an unprivileged user
    record = cpu_class.yield_cpu(handle_of(tree), "churn-green-40000")
    assert record["how"] == "none" and "RLIMIT_NICE" in record["why"]
    assert not any(cpu_class.is_idle(pid) for pid in pids(tree))
    cpu_class.reclaim_cpu(handle_of(tree), record)  # nothing to undo


def test_a_gone_process_leaves_no_group(tree: subprocess.Popen) -> None:
    record = cpu_class.yield_cpu(handle_of(tree), "churn-green-40002")
    for pid in reversed(pids(tree)):
        psutil.Process(pid).kill()
    tree.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (Path(record["group"]) / "cgroup.procs").read_text().split():
        assert time.monotonic() < deadline, "the killed processes stayed in the group"
        time.sleep(0.1)
    cpu_class.reclaim_cpu(handle_of(tree), record)
    assert not Path(record["group"]).exists()


@pytest.fixture
def container(docker_engine_ready: None) -> Iterator[object]:
    """A running container of the local base image (no network), removed at the end."""
    from versioned_service_fixtures import BASE_IMAGE

    from airmlops.serving.docker_engine import docker_client

    client = docker_client(timeout=60)
    running = client.containers.run(BASE_IMAGE, ["sleep", "120"], detach=True,
                                     network_mode="none", entrypoint=[],
                                     labels={"ai.airmlops.test": "test_cpu_class"})
    running.reload()
    yield running
    running.remove(force=True)
    client.close()


def container_handle(running: object) -> SlotHandle:
    return SlotHandle(target="docker", artifact="svc:1", port=40003, instance="test",
                      container_id=running.id)  # type: ignore[attr-defined]


def test_a_container_goes_into_the_idle_class_through_its_own_cgroup(container: object) -> None:
    pid = container.attrs["State"]["Pid"]  # type: ignore[attr-defined]
    assert not cpu_class.is_idle(pid)
    record = cpu_class.yield_cpu(container_handle(container), "churn-green-40003")
    assert record["how"] == "cgroup", record  # the engine runs on this host, as root
    assert cpu_class.is_idle(pid)
    assert container.id in record["group"]  # type: ignore[attr-defined]
    cpu_class.reclaim_cpu(container_handle(container), record)
    assert not cpu_class.is_idle(pid)


def test_a_container_whose_cgroup_is_out_of_reach_gets_the_lowest_cpu_shares(
        container: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_class, "_cgroup_of", lambda pid, root: None)  # another namespace
    record = cpu_class.yield_cpu(container_handle(container), "churn-green-40003")
    assert record == {"how": "docker-shares", "shares": cpu_class.DEFAULT_SHARES}
    container.reload()  # type: ignore[attr-defined]
    assert container.attrs["HostConfig"]["CpuShares"] == cpu_class.LOWEST_SHARES  # type: ignore[attr-defined]
    cpu_class.reclaim_cpu(container_handle(container), record)
    container.reload()  # type: ignore[attr-defined]
    assert container.attrs["HostConfig"]["CpuShares"] == cpu_class.DEFAULT_SHARES  # type: ignore[attr-defined]
