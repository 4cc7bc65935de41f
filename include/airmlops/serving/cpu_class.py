"""The shadow's CPU class: a shadow server runs on CPU time the live one leaves idle.

Linux runs an *idle* scheduling entity only when nothing else wants the CPU, and preempts it as
soon as a normal task wakes. A shadow slot's servers are put in that class for its window
(:func:`yield_cpu`) and taken out of it before they take live traffic (:func:`reclaim_cpu`), so
mirrored copies cost the live answers as little CPU as the machine can manage. How, in order:

* ``cgroup``: the servers' cgroup gets ``cpu.idle = 1`` (Linux 5.15 and later, cgroup v1 or
  v2). A container's cgroup is its own; a process slot's processes are moved into a cgroup the
  platform creates for it (``airmlops-shadow/<slot name>`` under the cpu controller's root),
  and back out of it at promotion, which removes it. Needs write access to the cgroup tree
  (root, or a delegated tree).
* ``docker-shares``: a container whose cgroup this process cannot reach (the engine is on
  another host or in another namespace) gets the lowest CPU weight, ``cpu_shares = 2``,
  through the engine's API; the old weight comes back at promotion.
* ``sched-idle``: every thread of a process slot gets the ``SCHED_IDLE`` policy and, with
  Linux autogroups, its session the lowest weight (nice 19); ``SCHED_OTHER`` and nice 0 at
  promotion. Lowering a policy needs no privilege but raising it does, so this is used only
  when this process may raise it again (root, or an ``RLIMIT_NICE`` that allows nice 0).
* ``none``: nothing could be done; the shadow competes with the live servers at equal weight
  (logged).

The result of :func:`yield_cpu` is a small JSON-ready record that :func:`reclaim_cpu` needs.
Every path and id it touches comes from the platform's own slot handle, never from a request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.processes import process_tree

if TYPE_CHECKING:
    from docker import DockerClient

    from airmlops.serving.deploy.state import SlotHandle

logger = logging.getLogger("airmlops.serving.deploy")

GROUP_PARENT = "airmlops-shadow"
"""The cgroup (under the cpu controller's root) holding a process slot's shadow cgroup."""
LOWEST_SHARES = 2
"""Docker's lowest ``cpu_shares``: the weight of a shadow container the cgroup is out of reach."""
DEFAULT_SHARES = 1024
IDLE_NICE = 19
PROC = Path("/proc")
MOUNTINFO = PROC / "self" / "mountinfo"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,100}")


def yield_cpu(handle: SlotHandle, name: str,
              docker_client: DockerClient | None = None) -> dict[str, Any]:
    """Put the slot instance ``handle`` (named ``name``) in the idle CPU class; the record
    :func:`reclaim_cpu` takes back (``{"how": ...}``). Never raises for a machine that cannot:
    it answers ``{"how": "none"}`` and logs why."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid slot name {name!r}")
    try:
        if handle.target == "docker":
            return _yield_container(handle, docker_client)
        return _yield_process(handle.pid, name)
    except (OSError, ValueError) as exc:
        logger.warning("shadow %s keeps its CPU weight: %s", name, exc)
        return {"how": "none", "why": str(exc)}


def reclaim_cpu(handle: SlotHandle, record: dict[str, Any],
                docker_client: DockerClient | None = None) -> None:
    """Take the slot instance ``handle`` out of the idle CPU class ``record`` put it in.
    OSError (or the engine's error) when it could not: a server still in the idle class must
    not take live traffic."""
    how = record.get("how")
    if how == "cgroup" and handle.target == "docker":
        _write(Path(record["group"]) / "cpu.idle", "0")
    elif how == "cgroup":
        _leave_group(handle.pid, Path(record["group"]), Path(record["home"]))
    elif how == "docker-shares":
        _container(handle, docker_client).update(cpu_shares=int(record["shares"]))
    elif how == "sched-idle":
        _set_policy(process_tree(handle.pid), os.SCHED_OTHER, 0)


def is_idle(pid: int) -> bool:
    """True if the process ``pid`` runs in the idle CPU class: its cgroup has ``cpu.idle``
    set, or its main thread the SCHED_IDLE policy."""
    if os.sched_getscheduler(pid) == os.SCHED_IDLE:
        return True
    group = _cgroup_of(pid, _cpu_root())
    try:
        return group is not None and (group / "cpu.idle").read_text().strip() == "1"
    except OSError:
        return False


# -- processes ---------------------------------------------------------------------------------


def _yield_process(pid: int | None, name: str) -> dict[str, Any]:
    """A process slot's tree into a cgroup of its own with ``cpu.idle``, else SCHED_IDLE."""
    if pid is None:
        raise ValueError("a process slot without a pid")
    pids = process_tree(pid)
    root = _cpu_root()
    home = _cgroup_of(pid, root) if root is not None else None
    if root is not None and home is not None and home == root:
        group = root / GROUP_PARENT / name
        try:
            group.mkdir(parents=True, exist_ok=True)
            if (root / "cgroup.controllers").exists():  # v2: the controller, level by level
                _write(root / "cgroup.subtree_control", "+cpu")
                _write(group.parent / "cgroup.subtree_control", "+cpu")
            _write(group / "cpu.idle", "1")
            for each in pids:
                _write(group / "cgroup.procs", str(each))
            return {"how": "cgroup", "group": str(group), "home": str(home)}
        except OSError as exc:
            logger.info("shadow %s: no cgroup of its own (%s); trying SCHED_IDLE", name, exc)
            _leave_group(pid, group, home)
    if not _may_raise_policy():
        raise ValueError("neither a cgroup nor a policy this process could raise again "
                         "(it is not root and RLIMIT_NICE does not allow nice 0)")
    _set_policy(pids, os.SCHED_IDLE, IDLE_NICE)
    return {"how": "sched-idle"}


def _leave_group(pid: int | None, group: Path, home: Path) -> None:
    """Move every process of ``group`` (the slot's tree, and anything it forked since) back to
    ``home`` and remove the group. OSError if one could not be moved."""
    if group.exists():
        procs = (group / "cgroup.procs").read_text().split()
        for each in procs:
            with contextlib.suppress(ProcessLookupError):
                _write(home / "cgroup.procs", each)
        group.rmdir()
    elif pid is not None and process_tree(pid):
        raise OSError(f"the shadow's cgroup {group} is gone")


def shadow_groups() -> list[Path]:
    """The cgroups of process slots now in the idle class (empty without a cgroup tree)."""
    root = _cpu_root()
    return sorted((root / GROUP_PARENT).glob("*/")) if root is not None else []


def release_group(name: str) -> None:
    """Remove the cgroup a stopped process slot ``name`` left behind, if empty (best effort)."""
    root = _cpu_root()
    if root is not None and _NAME.fullmatch(name):
        with contextlib.suppress(OSError):
            (root / GROUP_PARENT / name).rmdir()


def _set_policy(pids: list[int], policy: int, nice: int) -> None:
    """Every thread of ``pids``: ``policy``; each process's autogroup: ``nice``."""
    for pid in pids:
        tasks = PROC / str(pid) / "task"
        with contextlib.suppress(FileNotFoundError):
            for tid in os.listdir(tasks):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setscheduler(int(tid), policy, os.sched_param(0))
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            _write(PROC / str(pid) / "autogroup", str(nice))


def _may_raise_policy() -> bool:
    """True if this process may give a thread SCHED_OTHER at nice 0 again."""
    if os.geteuid() == 0:
        return True
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


# -- containers -------------------------------------------------------------------------------


def _container(handle: SlotHandle, client: DockerClient | None) -> Any:
    from airmlops.serving.docker_engine import docker_client

    if not handle.container_id:
        raise ValueError("a docker slot without a container id")
    return (client or docker_client(timeout=10)).containers.get(handle.container_id)


def _yield_container(handle: SlotHandle, client: DockerClient | None) -> dict[str, Any]:
    """A container's own cgroup gets ``cpu.idle``; out of reach, the lowest ``cpu_shares``."""
    container = _container(handle, client)
    pid = int(container.attrs.get("State", {}).get("Pid") or 0)
    root = _cpu_root()
    group = _cgroup_of(pid, root) if pid and root is not None else None
    if group is not None and group != root:
        try:
            _write(group / "cpu.idle", "1")
            return {"how": "cgroup", "group": str(group)}
        except OSError as exc:
            logger.info("container %s: cpu.idle not writable (%s); lowest cpu_shares instead",
                        container.name, exc)
    shares = int(container.attrs.get("HostConfig", {}).get("CpuShares") or DEFAULT_SHARES)
    container.update(cpu_shares=LOWEST_SHARES)
    return {"how": "docker-shares", "shares": shares}


# -- cgroup tree ------------------------------------------------------------------------------


def _cpu_root() -> Path | None:
    """The mount point of the cgroup hierarchy with the cpu controller (v1 ``cpu``, else a v2
    tree offering ``cpu``); None without one."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount = Path(fields[4])
        if tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            return mount
        if tail[0] == "cgroup2":
            unified = mount
    if unified is not None:
        with contextlib.suppress(OSError):
            if "cpu" in (unified / "cgroup.controllers").read_text().split():
                return unified
    return None


def _cgroup_of(pid: int, root: Path | None) -> Path | None:
    """The directory of ``pid``'s cgroup in the hierarchy mounted at ``root``; None if this
    process cannot see it."""
    if root is None:
        return None
    v2 = (root / "cgroup.controllers").exists()
    try:
        lines = (PROC / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and "cpu" in controllers.split(",")):
            folder = (root / path.lstrip("/")).resolve()
            if folder == root or root in folder.parents:
                return folder
    return None


def _write(path: Path, value: str) -> None:
    """Write ``value`` to the kernel file ``path``."""
    with open(path, "w") as handle:
        handle.write(value)
