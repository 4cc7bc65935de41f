"""The real stable-address proxy as a child process, for the tests that drive it over HTTP,
and the one polling helper they share (:func:`wait_until`)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from airmlops.platform import free_port
from airmlops.serving import proxy as proxy_mod

WAIT = 20.0
"""Longest any condition is waited for: far above what it needs, so a hang fails the test."""

P = TypeVar("P", bound="ProxyProcess")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class ProxyProcess:
    """``python -m airmlops.serving.proxy`` on a free port with its state directory; its log
    is ``proxy.log`` there. ``extra`` arguments are passed on every start."""

    health_interval = 0.1

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir, self.extra = state_dir, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = proxy_mod.ensure_admin_token(state_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def argv(self, *extra: str) -> list[str]:
        """The command line, with ``extra`` arguments at its end."""
        return [sys.executable, "-m", "airmlops.serving.proxy", "--port", str(self.port),
                "--state-dir", str(self.state_dir), "--health-interval",
                str(self.health_interval), *extra]

    def start(self, *extra: str) -> None:
        """Start the process (with ``extra`` arguments this time) and wait until it is live."""
        with open(self.state_dir / "proxy.log", "ab") as log:
            self.process = subprocess.Popen(self.argv(*self.extra, *extra), stdout=log,
                                            stderr=subprocess.STDOUT)

        def alive() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log()
            return proxy_mod.livez(self.port, timeout=1.0)

        wait_until(alive, "the proxy to start")

    def stop(self) -> None:
        """Terminate it (kill after 20 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        """Everything it wrote."""
        return (self.state_dir / "proxy.log").read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        """``GET /__proxy/state``."""
        return proxy_mod.get_state(self.port)

    def admin(self, action: str, body: Any, token: str | None = None) -> httpx.Response:
        """POST ``body`` to ``/__proxy/<action>`` (``token=""`` sends no Authorization)."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(f"{self.url}/__proxy/{action}", json=body, headers=headers,
                          timeout=10.0, trust_env=False)


def started_proxies(kind: type[P], tmp_path: Path) -> Iterator[Callable[..., P]]:
    """The body of a fixture starting proxies of ``kind`` (each with its own state directory
    under ``tmp_path`` unless given one); all are stopped afterwards."""
    started: list[P] = []

    def start(*extra: str, state_dir: Path | None = None) -> P:
        directory = state_dir or tmp_path / f"proxy-{len(started)}"
        directory.mkdir(exist_ok=True)
        started.append(kind(directory, *extra))
        return started[-1]

    yield start
    for one in started:
        one.stop()
