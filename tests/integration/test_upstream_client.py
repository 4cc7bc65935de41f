"""The proxy's upstream client (airmlops.serving.upstream) against raw loopback servers that
answer exactly the bytes each case needs: keep-alive reuse and expiry, framing (length,
chunked, until close, HEAD), and each failure mapped to the error the proxy's retry rule reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from airmlops.serving import upstream as upstream_mod
from airmlops.serving.upstream import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length framed), as the server received them."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class RawServer:
    """A loopback server running ``handler(reader, writer, connection_number)`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []

    async def __aenter__(self) -> RawServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    def answering(self, *answers: bytes) -> Handler:
        async def handler(reader, writer, _number) -> None:
            for answer in answers:
                self.requests.append(await read_request(reader))
                writer.write(answer)
                await writer.drain()
            await reader.read()  # keep the connection open until the client closes it
        return handler


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 20))


def test_keep_alive_connections_are_reused_and_requests_are_sent_faithfully() -> None:
    async def case() -> None:
        server = RawServer(None)  # type: ignore[arg-type]
        server.handler = server.answering(OK, OK, OK)
        async with server:
            pool = UpstreamPool()
            headers = [("Content-Type", "application/json"), ("X-Custom", "kept")]
            for _ in range(3):
                answer = await pool.request("127.0.0.1", server.port, "POST", "/predict?q=1",
                                            headers, b'{"x": 1}', timeout=5)
                assert (answer.status, answer.body) == (200, b'{"a":1}')
                assert (b"Content-Type", b"application/json") in answer.headers
            await pool.close()
        assert server.connections == 1
        head, body = server.requests[0]
        assert head.startswith(b"POST /predict?q=1 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
        assert b"X-Custom: kept\r\n" in head and b"Content-Length: 8\r\n" in head
        assert body == b'{"x": 1}'

    run(case())


def test_chunked_close_delimited_and_head_answers_are_read_whole() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"

    async def case() -> None:
        server = RawServer(None)  # type: ignore[arg-type]
        server.handler = server.answering(chunked, head)
        async with server:
            pool = UpstreamPool()
            answer = await pool.request("127.0.0.1", server.port, "GET", "/", [], None,
                                        timeout=5)
            assert answer.body == b"abcdefg"
            answer = await pool.request("127.0.0.1", server.port, "HEAD", "/", [], None,
                                        timeout=5)
            assert answer.status == 200 and answer.body == b""
            assert (b"Content-Length", b"1234") in answer.headers
            assert b"Content-Length" not in server.requests[0][0]  # no body, no length
            await pool.close()

        async def until_close(reader, writer, _number) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            await writer.drain()

        async with RawServer(until_close) as closing:
            pool = UpstreamPool()
            for _ in range(2):  # the closed connection is not reused
                answer = await pool.request("127.0.0.1", closing.port, "GET", "/", [], None,
                                            timeout=5)
                assert answer.body == b"all of it"
            assert closing.connections == 2
            await pool.close()

    run(case())


def test_idle_connections_expire() -> None:
    async def case() -> None:
        server = RawServer(None)  # type: ignore[arg-type]
        server.handler = server.answering(OK, OK)
        async with server:
            pool = UpstreamPool(keepalive_expiry=0.05)
            await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
            await asyncio.sleep(0.1)
            await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
            assert server.connections == 2
            await pool.close()

    run(case())


def test_each_failure_says_how_far_the_request_got(monkeypatch: pytest.MonkeyPatch) -> None:
    async def hang_up(reader, writer, _number) -> None:
        await read_request(reader)

    async def silent(reader, writer, _number) -> None:
        await read_request(reader)
        await reader.read()  # no answer; the client gives up and closes

    async def garbage(reader, writer, _number) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def cut_off(reader, writer, _number) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async def huge(reader, writer, _number) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await reader.read()

    async def case() -> None:
        pool = UpstreamPool(connect_timeout=1)
        async with RawServer(hang_up) as server:
            port = server.port
            with pytest.raises(UpstreamClosedError) as closed:
                await pool.request("127.0.0.1", port, "GET", "/", [], None, timeout=5)
            assert closed.value.reused is False
        with pytest.raises(UpstreamConnectError, match="cannot connect"):
            await pool.request("127.0.0.1", port, "GET", "/", [], None, timeout=5)
        async with RawServer(silent) as server:
            with pytest.raises(TimeoutError):
                await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=0.2)
        async with RawServer(garbage) as server:
            with pytest.raises(UpstreamProtocolError, match="invalid HTTP answer"):
                await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
        async with RawServer(cut_off) as server:
            with pytest.raises(UpstreamProtocolError, match="cut off"):
                await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
        monkeypatch.setattr(upstream_mod, "MAX_RESPONSE_BYTES", 50)
        async with RawServer(huge) as server:
            with pytest.raises(UpstreamProtocolError, match="exceeds 50 bytes"):
                await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
        with pytest.raises(ValueError, match="CR or LF"):
            await pool.request("127.0.0.1", 1, "GET", "/", [("X-A", "b\r\nX-Evil: 1")], None,
                               timeout=5)
        assert not any(pool._idle.values())  # no failed connection was kept for reuse
        await pool.close()

    run(case())


def test_a_reused_connection_closed_by_the_upstream_is_reported_as_reused() -> None:
    async def once_then_hang_up(reader, writer, number) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # the second request arrives, then the upstream closes

    async def case() -> None:
        async with RawServer(once_then_hang_up) as server:
            pool = UpstreamPool()
            await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
            with pytest.raises(UpstreamClosedError) as closed:
                await pool.request("127.0.0.1", server.port, "GET", "/", [], None, timeout=5)
            assert closed.value.reused is True
            await pool.close()

    run(case())
