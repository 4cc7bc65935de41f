"""A real Redis server for the test session: ``redis_server`` yields its URL.

Import the fixture into a test module (``from redis_fixture import redis_server``, with this
folder on ``sys.path``). It runs ``scripts/ensure-redis.sh`` (which installs the binary when it
is missing and fails loudly when it cannot), starts ``redis-server`` on a free loopback port in a
temporary directory with persistence off, waits for PING and stops it at the end. It never
skips: a missing Redis is a failure.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_binary() -> str:
    if shutil.which("redis-server") is None:
        done = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "ensure-redis.sh")],
            capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0:
            pytest.fail(
                "scripts/ensure-redis.sh could not provide redis-server:\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH after scripts/ensure-redis.sh")
    return binary


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (redis://127.0.0.1:<port>/0) of a private Redis server."""
    yield from run_redis_server(tmp_path_factory.mktemp("redis"))


def run_redis_server(workdir: Path) -> Iterator[str]:
    """Start a private redis-server in ``workdir``, yield its URL, stop it afterwards."""
    binary = _ensure_binary()
    port = _free_port()
    log_path = workdir / "redis.log"
    process = subprocess.Popen(
        [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log_path),
            "--daemonize", "no",
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not _ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text() if log_path.exists() else ""
                pytest.fail(f"redis-server did not answer PING on port {port}:\n{log[-2000:]}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class PrivateRedis:
    """A redis-server one test owns (it may change its settings), stopped (saving its data)
    and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.binary = _ensure_binary()
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--dbfilename", "dump.rdb",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not _ping(self.port):
            assert time.monotonic() < deadline and self.process.poll() is None
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down (saving its data) and wait until its port is closed."""
        import redis

        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(redis.ConnectionError):  # it closes as the server exits
            redis.Redis.from_url(self.url).shutdown(save=True)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", self.port)) != 0
