"""Slow and oversized clients against the stable address and the model service, on raw sockets.

Every attack runs against both real servers: the model service (``bentoml serve`` of a bento
built from a registered model, as in tests/integration/test_service.py) and the stable-address
proxy (``python -m airmlops.serving.proxy``) in front of it. Both run with short timeouts and a
small connection cap so that the limits are reached quickly; the defaults are longer
(:mod:`airmlops.serving.http_limits`). Each case asserts the refusal (status, JSON error naming
the limit, connection closed) and that nothing was served: the model service's count of answered
predictions (``/predict`` with status 200; the proxy forwards there too) is unchanged. uvicorn
hands a request to the application once its headers are in, so a request cut off in its body
may be counted as refused; it must never be scored. ``test_control_...`` shows the count moves.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from model_service_fixtures import metric

from airmlops.platform import free_port
from airmlops.serving import proxy as proxy_mod

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
KEEP_ALIVE = 2.5
MAX_CONNECTIONS = 6
MAX_BODY = 20_000
MAX_HEADER_BYTES = 16_384
WAIT = 15.0
"""Longest a socket waits for an answer: far above every limit, so a hang fails the test."""


@dataclasses.dataclass
class Target:
    """A server under attack and how to read how many requests reached its application."""

    name: str
    port: int
    reached: Callable[[], float]
    body: bytes


@dataclasses.dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    closed: bool


@pytest.fixture(scope="module")
def service(serve, model):
    return serve("http-limits", MLOPS_SERVING_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT),
                 MLOPS_SERVING_BODY_TIMEOUT_S=str(BODY_TIMEOUT),
                 MLOPS_SERVING_KEEP_ALIVE_S=str(KEEP_ALIVE),
                 MLOPS_SERVING_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                 MLOPS_SERVING_MAX_BODY_BYTES=str(MAX_BODY))


@pytest.fixture(scope="module")
def stable_address(service, tmp_path_factory) -> Iterator[int]:
    """The real proxy process in front of the model service."""
    state = tmp_path_factory.mktemp("proxy-state")
    port = free_port()
    log = open(state / "proxy.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "airmlops.serving.proxy", "--port", str(port), "--state-dir",
         str(state), "--upstream", service.url, "--slot", "blue",
         "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
         "--keep-alive", str(KEEP_ALIVE), "--max-connections", str(MAX_CONNECTIONS),
         "--max-body-bytes", str(MAX_BODY)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not proxy_mod.healthz(port):
        assert process.poll() is None, (state / "proxy.log").read_text()
        assert time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=20)
    log.close()


@pytest.fixture(params=["stable_address", "model_service"])
def target(request, model, service) -> Target:
    body = json.dumps({"instances": [{"customer_id": model.known[0],
                                      "tenure_days": 12.0}]}).encode()
    def reached() -> float:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        return metric(text, "airmlops_requests_total", endpoint="/predict", status="200")

    if request.param == "model_service":
        return Target("model_service", int(service.url.rsplit(":", 1)[1]), reached, body)
    port = request.getfixturevalue("stable_address")
    return Target("stable_address", port, reached, body)


def _read(sock: socket.socket) -> Answer:
    """Read until the server closes (or WAIT passes: then ``closed`` is False)."""
    sock.settimeout(WAIT)
    data, closed = b"", False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True  # the server closed with our unread bytes in its buffer
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.1 ") else None
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(status, headers, body, closed)


def _send(port: int, *pieces: bytes) -> Answer:
    """Send ``pieces`` (a broken pipe means the server already answered) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        return _read(sock)


def _post_head(length: int | None = None, extra: bytes = b"") -> bytes:
    framing = b"" if length is None else b"Content-Length: %d\r\n" % length
    return (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + framing + extra + b"\r\n")


def _refused(answer: Answer, status: int, error: str, words: str) -> None:
    assert answer.status == status, answer
    assert json.loads(answer.body)["error"] == error
    assert words in json.loads(answer.body)["message"]
    assert answer.headers.get("connection") == "close" and answer.closed


def test_control_a_whole_request_is_served_and_counted(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port, _post_head(len(target.body), b"Connection: close\r\n")
                   + target.body)
    assert answer.status == 200, answer
    assert target.reached() == before + 1


# --- oversized heads: 431 ---------------------------------------------------------------------

HEAD_ATTACKS = {
    "one 1 MiB header": [_post_head(extra=b"X-Big: " + b"a" * (1 << 20) + b"\r\n")],
    "10,000 header lines": [_post_head(extra=b"".join(b"X-H%d: 1\r\n" % i for i in range(10_000)))],
    "90 headers of 250 bytes": [_post_head(extra=b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 250) for i in range(90)))],
    "64 KiB URL": [b"GET /predict?" + b"q" * 65_536 + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
    "1 MiB header sent in 64 KiB pieces": [_post_head()[:-2] + b"X-Big: "] + [b"a" * 65_536] * 16,
}


@pytest.mark.parametrize("attack", list(HEAD_ATTACKS), ids=list(HEAD_ATTACKS))
def test_oversized_headers_get_431(target: Target, attack: str) -> None:
    before = target.reached()
    answer = _send(target.port, *HEAD_ATTACKS[attack])
    assert answer.status == 431, answer
    assert json.loads(answer.body)["error"] in ("headers_too_large", "too_many_headers")
    assert str(MAX_HEADER_BYTES) in json.loads(answer.body)["message"] or \
        "100 request header lines" in json.loads(answer.body)["message"]
    assert answer.closed
    assert target.reached() == before


# --- slow clients: 408 ------------------------------------------------------------------------


def test_half_sent_header_times_out_with_408(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port, _post_head(len(target.body))[:40])
    _refused(answer, 408, "header_timeout", f"within {HEADER_TIMEOUT:g} s")
    assert target.reached() == before


@pytest.mark.parametrize("lead", [b"\r\n", b"\r\n" * 50, b"\n"],
                         ids=["one blank line", "fifty blank lines", "one bare LF"])
def test_blank_lines_before_a_request_time_out_with_408(target: Target, lead: bytes) -> None:
    """The parser starts a message only after leading blank lines: the header clock must
    start at the first byte anyway, or such a connection is held open forever."""
    before = target.reached()
    answer = _send(target.port, lead)
    _refused(answer, 408, "header_timeout", f"within {HEADER_TIMEOUT:g} s")
    assert target.reached() == before


def test_header_trickled_a_byte_at_a_time_times_out_with_408(target: Target) -> None:
    """Slowloris: each byte arrives before any idle timer would fire, the head never ends."""
    before = target.reached()
    with socket.create_connection(("127.0.0.1", target.port), timeout=WAIT) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        stopped = time.monotonic() + WAIT
        while time.monotonic() < stopped:
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.3)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
        answer = _read(sock)
    _refused(answer, 408, "header_timeout", "request headers not received")
    assert target.reached() == before


def test_short_body_times_out_with_408(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port, _post_head(len(target.body)) + target.body[:10])
    _refused(answer, 408, "body_timeout", f"within {BODY_TIMEOUT:g} s")
    assert target.reached() == before


def test_chunked_body_that_never_ends_times_out_with_408(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port, _post_head(extra=b"Transfer-Encoding: chunked\r\n")
                   + b"%x\r\n" % len(target.body) + target.body + b"\r\n")
    _refused(answer, 408, "body_timeout", "request body not received")
    assert target.reached() == before


# --- idle connections are closed --------------------------------------------------------------


def test_idle_keep_alive_connection_is_closed(target: Target) -> None:
    with socket.create_connection(("127.0.0.1", target.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n" if target.name == "model_service"
                     else b"GET /__proxy/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read(sock)
    assert answer.status == 200 and answer.closed  # kept alive, then closed when idle
    assert "close" not in answer.headers.get("connection", "")


def test_connection_that_sends_nothing_is_closed(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port)
    assert answer.closed and answer.status is None and answer.body == b""
    assert target.reached() == before


# --- too many connections: 503 ----------------------------------------------------------------


def test_a_request_beyond_the_connection_cap_gets_503(target: Target) -> None:
    before = target.reached()
    held = [socket.create_connection(("127.0.0.1", target.port), timeout=WAIT)
            for _ in range(MAX_CONNECTIONS)]
    try:
        answer = _send(target.port, _post_head(len(target.body)) + target.body)
    finally:
        for sock in held:
            sock.close()
    _refused(answer, 503, "too_many_connections", f"maximum of {MAX_CONNECTIONS} connections")
    assert answer.headers["retry-after"] == "1"
    assert target.reached() == before
    # Once the held connections are gone, the same request is served.
    deadline = time.monotonic() + WAIT
    while True:
        served = _send(target.port, _post_head(len(target.body), b"Connection: close\r\n")
                       + target.body)
        if served.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert served.status == 200, served


# --- oversized bodies: 413 --------------------------------------------------------------------


def test_body_declared_too_large_gets_413_before_it_is_sent(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port, _post_head(MAX_BODY + 1))
    _refused(answer, 413, "body_too_large", f"exceeds the limit of {MAX_BODY} bytes")
    assert target.reached() == before


def test_body_declared_in_petabytes_gets_413(target: Target) -> None:
    before = target.reached()
    answer = _send(target.port, _post_head(10**15))
    _refused(answer, 413, "body_too_large", f"exceeds the limit of {MAX_BODY} bytes")
    assert target.reached() == before


def test_chunked_body_too_large_gets_413_while_it_streams(target: Target) -> None:
    before = target.reached()
    chunk = b"%x\r\n%s\r\n" % (4096, b" " * 4096)
    answer = _send(target.port, _post_head(extra=b"Transfer-Encoding: chunked\r\n"),
                   *[chunk] * (MAX_BODY // 4096 + 2), b"0\r\n\r\n")
    _refused(answer, 413, "body_too_large", f"body exceeds the limit of {MAX_BODY} bytes")
    assert target.reached() == before


# --- malformed framing and smuggling: 400 -----------------------------------------------------

SMUGGLED = b"GET /__proxy/state HTTP/1.1\r\nHost: x\r\n\r\n"
FRAMING_ATTACKS = {
    "Content-Length not a number": _post_head(extra=b"Content-Length: 12abc\r\n"),
    "negative Content-Length": _post_head(extra=b"Content-Length: -1\r\n"),
    "two different Content-Lengths": _post_head(extra=b"Content-Length: 5\r\n"
                                                b"Content-Length: 60\r\n") + b"x" * 60,
    "Content-Length and Transfer-Encoding (CL.TE)": _post_head(
        extra=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding and Content-Length (TE.CL)": _post_head(
        extra=b"Transfer-Encoding: chunked\r\nContent-Length: 60\r\n")
    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
    "obfuscated Transfer-Encoding": _post_head(
        extra=b"Transfer-Encoding: chunked, identity\r\n") + b"0\r\n\r\n" + SMUGGLED,
    "space before the header colon": _post_head(
        extra=b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n") + b"0\r\n\r\n" + SMUGGLED,
    "bare LF in chunk size": _post_head(extra=b"Transfer-Encoding: chunked\r\n")
    + b"5\nhello\r\n0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("attack", list(FRAMING_ATTACKS), ids=list(FRAMING_ATTACKS))
def test_malformed_framing_and_smuggling_get_400(target: Target, attack: str) -> None:
    before = target.reached()
    answer = _send(target.port, FRAMING_ATTACKS[attack])
    assert answer.status == 400, answer
    assert answer.closed
    assert b"HTTP/1.1" not in answer.body  # one answer only: nothing smuggled was served
    assert target.reached() == before
