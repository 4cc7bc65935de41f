"""A lean HTTP/1.1 client for the stable-address proxy: keep-alive connections to loopback
upstreams, responses parsed by httptools (llhttp, the C parser uvicorn uses).

The proxy sends one small request and reads one small answer per client request; aiohttp's
client spent ~65 % of the proxy's CPU doing that (py-spy, benchmarks/README.md). This client does
only what the proxy needs: the request is written as one buffer, the answer is read whole
(Content-Length, chunked, or until close) with one timer for the whole exchange. Health checks
use :func:`probe`: one GET on a fresh connection, closed afterwards.

Errors say how far the request got, which is what the proxy's retry rule needs:

* :class:`UpstreamConnectError`: no connection was made, so nothing reached the upstream;
* :class:`UpstreamClosedError`: a connection closed before any byte of the answer arrived
  (``reused`` says whether it was an idle keep-alive connection: the classic keep-alive race);
* :class:`UpstreamProtocolError`: the answer was not valid HTTP/1.1, or was cut off;
* ``TimeoutError``: no complete answer within the timeout.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class UpstreamError(Exception):
    """The exchange with the upstream failed (see the subclasses)."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: the request never reached the upstream."""


class UpstreamClosedError(UpstreamError):
    """The connection closed before any byte of the answer arrived."""

    def __init__(self, message: str, *, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused


class UpstreamProtocolError(UpstreamError):
    """The answer was not valid HTTP/1.1, too large, or cut off."""


class Response:
    """A complete upstream answer: status, raw headers (name, value) and the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self) -> None:
        import httptools

        self._httptools = httptools
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Response] | None = None
        self._parser: Any = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._received = False
        self._headers_done = False
        self._framed = False  # Content-Length or chunked: the end is known without a close
        self._head = False
        self._reused = False

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for (an answer after the one expected): unusable connection.
            self._close()
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except self._httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the upstream switched protocols"))
        except self._httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__  # raised by a callback: a body too large
            self._fail(cause if isinstance(cause, UpstreamProtocolError)
                       else UpstreamProtocolError(f"invalid HTTP answer: {exc}"))
        except UpstreamProtocolError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if not self._received:
            waiter.set_exception(UpstreamClosedError(
                "the upstream closed the connection before answering", reused=self._reused))
        elif self._headers_done and not self._framed:
            self._finish(keep_alive=False)  # an answer delimited by the close
        else:
            waiter.set_exception(UpstreamProtocolError("the answer was cut off"))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        names = {name.lower() for name, _ in self._headers}
        self._framed = b"content-length" in names or b"transfer-encoding" in names
        status = self._parser.get_status_code()
        if self._head or status in (204, 304) or 100 <= status < 200:
            # llhttp would wait for the body a HEAD answer's Content-Length announces: the
            # answer is complete now, and the connection is not reused (its state is unknown).
            self._finish(keep_alive=False)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            raise UpstreamProtocolError(f"the answer exceeds {MAX_RESPONSE_BYTES} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._finish(keep_alive=self._parser.should_keep_alive())

    # -- exchange -------------------------------------------------------------------------------

    def start(self, request: bytes, *, head: bool, reused: bool) -> asyncio.Future[Response]:
        """Send ``request`` (complete bytes) and return the future answer."""
        self._waiter = asyncio.get_running_loop().create_future()
        self._parser = self._httptools.HttpResponseParser(self)
        self._headers, self._body, self._size = [], [], 0
        self._received = self._headers_done = self._framed = False
        self._head, self._reused = head, reused
        self.transport.write(request)  # type: ignore[union-attr]
        return self._waiter

    def _finish(self, *, keep_alive: bool) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        status = self._parser.get_status_code()
        waiter.set_result(Response(status, self._headers, b"".join(self._body)))
        if not keep_alive:
            self._close()

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return (not self.closed and self._waiter is not None and self._waiter.done()
                and not self._waiter.cancelled() and self._waiter.exception() is None
                and self.transport is not None and not self.transport.is_closing())


class UpstreamPool:
    """Keep-alive connections per ``(host, port)``, at most ``limit`` exchanges at once.

    Idle connections older than ``keepalive_expiry`` seconds are dropped instead of reused, so
    an upstream that closes idle connections after a longer timeout is never raced.
    """

    def __init__(self, *, limit: int = 256, keepalive_expiry: float = 2.0,
                 connect_timeout: float = 2.0) -> None:
        self.keepalive_expiry = keepalive_expiry
        self.connect_timeout = connect_timeout
        self._limit = asyncio.Semaphore(limit)
        self._idle: dict[tuple[str, int], collections.deque[_Connection]] = {}

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        *,
        timeout: float,
    ) -> Response:
        """One exchange; ``headers`` must not contain Host, Content-Length or hop-by-hop
        fields (the client adds Host and Content-Length). ``body`` None sends no body and no
        Content-Length."""
        request = _encode(host, port, method, target, headers, body)
        async with self._limit:
            async with asyncio.timeout(timeout):
                connection, reused = await self._acquire(host, port)
                try:
                    response = await connection.start(request, head=method == "HEAD",
                                                      reused=reused)
                except BaseException:
                    connection._close()
                    raise
            if connection.reusable:
                connection.idle_since = time.monotonic()
                self._idle.setdefault((host, port), collections.deque()).append(connection)
            return response

    async def _acquire(self, host: str, port: int) -> tuple[_Connection, bool]:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if connection.reusable and now - connection.idle_since < self.keepalive_expiry:
                return connection, True
            connection._close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(_Connection, host, port)
        except TimeoutError:
            raise UpstreamConnectError(
                f"connecting to {host}:{port} took over {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        return connection, False

    def drop_expired(self) -> None:
        """Close idle connections past their expiry."""
        now = time.monotonic()
        for idle in self._idle.values():
            for connection in [c for c in idle if now - c.idle_since >= self.keepalive_expiry]:
                idle.remove(connection)
                connection._close()

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop()._close()
        self._idle.clear()


async def probe(host: str, port: int, target: str, *, timeout: float) -> int:
    """The status of one ``GET target`` on a fresh connection, closed afterwards.

    For health checks: a new connection shows that the upstream still accepts connections,
    which an idle pooled one (it may outlive the upstream's listener) would not. Raises the
    errors of :meth:`UpstreamPool.request`.
    """
    request = _encode(host, port, "GET", target, (("Connection", "close"),), None)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        try:
            _, connection = await loop.create_connection(_Connection, host, port)
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        try:
            response = await connection.start(request, head=False, reused=False)
        finally:
            connection._close()
    return response.status


def _encode(host: str, port: int, method: str, target: str,
            headers: Sequence[tuple[str, str]], body: bytes | None) -> bytes:
    """The request as one buffer. Every piece came through the proxy's own HTTP parser or its
    validated upstream; CR/LF anywhere is refused all the same (no header injection)."""
    pieces = [method, target, *(part for header in headers for part in header)]
    if any("\r" in piece or "\n" in piece for piece in pieces):
        raise ValueError("a request line or header contains CR or LF")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + (body or b"")
