"""The stable address of a deployment: its proxy process started, reused and pointed at the
recorded active slot."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airmlops.processes import (
    PROXY,
    child_env,
    file_tail,
    port_free,
    process_alive,
    spawn_detached,
    stop_process,
)
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy.errors import DeployError
from airmlops.serving.deploy.state import (
    DEPLOYMENT_MARKER,
    deployment_dir,
    load_state,
    locked,
    save_state,
    upstreams,
    validate_pipeline,
    validate_port,
)

logger = logging.getLogger("airmlops.serving.deploy")


@dataclasses.dataclass(frozen=True)
class ProxyHandle:
    """The running proxy of a pipeline: the stable address and how to drive it."""

    pipeline: str
    port: int
    pid: int
    create_time: float
    state_dir: Path
    token: str = dataclasses.field(repr=False)

    @property
    def url(self) -> str:
        """The stable address users call."""
        return proxy_mod.proxy_url(self.port)



def ensure_proxy(pipeline: str, port: int, root: Path, *, timeout: float = 20.0) -> ProxyHandle:
    """The pipeline's proxy on ``port``: reused when alive, started otherwise.

    A (re)started proxy is pointed at the recorded active slot. Raises :class:`DeployError`
    when the pipeline's proxy runs on another port or ``port`` is taken by something else.
    """
    validate_pipeline(pipeline)
    validate_port(port)
    root = Path(root)
    with locked(pipeline, root):
        state = load_state(pipeline, root)
        handle = ensure_proxy_locked(pipeline, port, root, state, timeout)
        save_state(pipeline, root, state)
        return handle


def ensure_proxy_locked(
    pipeline: str, port: int, root: Path, state: dict[str, Any], timeout: float
) -> ProxyHandle:
    """Reuse or start the proxy; updates ``state["proxy"]`` in memory (the caller saves)."""
    directory = deployment_dir(pipeline, root)
    proxy_dir = directory / "proxy"
    token = proxy_mod.ensure_admin_token(proxy_dir)
    recorded = state.get("proxy") or {}
    active = state.get("active")
    active_record = state["slots"].get(active) if active else None

    if process_alive(recorded.get("pid"), recorded.get("create_time")):
        if recorded.get("port") != port:
            raise DeployError(
                f"the stable address of {pipeline} is port {recorded.get('port')}, not {port}: "
                "undeploy first to move it"
            )
        if _wait_proxy(port, recorded["pid"], recorded["create_time"], timeout):
            handle = ProxyHandle(
                pipeline, port, recorded["pid"], recorded["create_time"], proxy_dir, token
            )
            _reconcile_proxy(handle, state)
            return handle
        stop_process(recorded["pid"], recorded["create_time"], None, timeout=5.0)

    if not port_free(port):
        raise DeployError(f"port {port} is taken by another program; cannot serve {pipeline} there")
    argv = [
        sys.executable,
        "-m",
        "airmlops.serving.proxy",
        "--port",
        str(port),
        "--state-dir",
        str(proxy_dir),
    ]
    if active_record:
        for url in upstreams(active_record):
            argv += ["--upstream", url]
        argv += ["--slot", active, "--version", str(active_record["model_version"]),
                 "--spares", str(active_record.get("spares", 0))]
    env = {**child_env(PROXY), DEPLOYMENT_MARKER: state["deployment_id"]}
    proc = spawn_detached(argv, env, directory / "logs" / "proxy.log", cwd=directory)
    create_time = proc.create_time()
    if not _wait_proxy(port, proc.pid, create_time, timeout):
        stop_process(proc.pid, create_time, None, timeout=5.0)
        raise DeployError(
            f"the proxy of {pipeline} did not start on port {port} within {timeout:g} s:\n"
            + file_tail(directory / "logs" / "proxy.log")
        )
    state["proxy"] = {
        "port": port,
        "pid": proc.pid,
        "create_time": create_time,
        "url": proxy_mod.proxy_url(port),
    }
    logger.info("proxy of %s started on %s (pid %s)", pipeline, proxy_mod.proxy_url(port), proc.pid)
    handle = ProxyHandle(pipeline, port, proc.pid, create_time, proxy_dir, token)
    _reconcile_proxy(handle, state)
    return handle


def _wait_proxy(port: int, pid: int, create_time: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy_mod.livez(port, timeout=1.0):
            return True
        if not process_alive(pid, create_time):
            return False
        time.sleep(0.1)
    return False


def _reconcile_proxy(handle: ProxyHandle, state: Mapping[str, Any]) -> None:
    """Point the proxy at the recorded active slot's servers if it points elsewhere (e.g. after
    a crash), and tell it the standby slot's."""
    active = state.get("active")
    for slot, record in state["slots"].items():
        if not record:
            continue
        urls = upstreams(record)
        try:
            if slot == active:
                current = proxy_mod.get_state(handle.port)
                listed = (current.get("slots") or {}).get(slot) or {}
                known = [u.get("url") for u in listed.get("upstreams", ())]
                if current.get("active") == slot and known == urls:
                    continue
                proxy_mod.switch(handle.port, handle.token, urls, slot,
                                 version=record.get("model_version"), verify=False,
                                 spares=record.get("spares", 0))
            else:
                proxy_mod.register(handle.port, handle.token, slot, urls,
                                   record.get("model_version"), spares=record.get("spares", 0))
        except proxy_mod.ProxyAdminError as exc:
            logger.warning("proxy of %s could not be told about slot %s: %s", handle.pipeline,
                           slot, exc)
