"""HTTP/1.1 limits for the servers that face clients: the stable address and the model service.

Both run uvicorn with httptools, which by itself accepts headers of any size and number and
waits for a slow client forever. :func:`guarded_protocol` makes a subclass of uvicorn's
``HttpToolsProtocol`` that enforces :class:`HttpLimits` while it parses, before any request
reaches the application:

- the request line and headers above ``max_header_bytes`` bytes, or more than
  ``max_header_count`` header lines: ``431``;
- a body above ``max_body_bytes`` (a ``Content-Length`` that says so, or chunks that add up to
  it): ``413``;
- headers not complete ``header_timeout_s`` seconds after the request's first byte, or a body
  not complete ``body_timeout_s`` seconds after its headers: ``408``;
- a connection beyond ``max_connections`` open ones: its request is answered ``503`` with
  ``Retry-After`` (the connection is closed, nothing reaches the application);
- a keep-alive connection idle for ``keep_alive_s`` seconds (also a new connection that sends
  nothing) is closed.

Each refusal is a small JSON body (``{"error", "message"}``, the message naming the limit) with
``Connection: close``; malformed framing (a bad ``Content-Length``, both ``Content-Length`` and
``Transfer-Encoding``) is refused ``400`` by the parser itself, as before.

The proxy passes the class to ``uvicorn.Config(http=...)``; the model service, whose uvicorn is
configured by BentoML, installs it with :func:`install_as_uvicorn_default` when the service
module is loaded in the worker (before BentoML builds its ``uvicorn.Config``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, ClassVar

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
DEFAULT_MAX_CONNECTIONS = 512


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """What one connection may cost a server (see the module docstring for the answers)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for field in ("max_header_bytes", "max_header_count", "max_body_bytes",
                      "max_connections"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        for field in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{field}: expected a positive number of seconds, got {value!r}")


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal is in ``_refusal``."""


class _LimitsGuard:
    """The limit-enforcing half of the guarded protocol, mixed in before uvicorn's
    ``HttpToolsProtocol`` by :func:`guarded_protocol` (which sets ``http_limits``).

    Kept free of uvicorn imports so that importing this module does not import uvicorn.
    """

    http_limits: ClassVar[HttpLimits]
    # Provided by HttpToolsProtocol:
    connections: Any
    loop: Any
    transport: Any
    cycle: Any
    client: Any
    headers: list[tuple[bytes, bytes]]
    timeout_keep_alive_handler: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.http_limits.keep_alive_s
        self._in_head = True
        self._in_body = False
        self._head_received = 0
        self._header_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._over_limit = False
        self._deadline: Any = None
        self._refusal: tuple[int, str, str] | None = None

    # -- connection -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        """Register the connection, note whether it is beyond the cap and start its idle clock."""
        super().connection_made(transport)  # type: ignore[misc]
        limits = self.http_limits
        self._over_limit = len(self.connections) > limits.max_connections
        # A connection that never sends a byte is closed like an idle keep-alive one.
        self.timeout_keep_alive_task = self.loop.call_later(
            limits.keep_alive_s, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop any pending deadline, then let uvicorn clean up."""
        self._cancel_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        """Feed ``data`` to the parser, timing the head and capping its unparsed bytes."""
        if self._refusal is not None:
            return
        limits = self.http_limits
        if self._in_head:
            self._head_received += len(data)
            if self._deadline is None and data:
                # The clock starts at the first byte of any kind: the parser begins a
                # message only after leading blank lines, which would hold it open forever.
                self._arm(limits.header_timeout_s, "header_timeout",
                          f"request headers not received within {limits.header_timeout_s:g} s")
        super().data_received(data)  # type: ignore[misc]
        # Bytes still unparsed as a complete head count against the header cap, so a
        # single huge header line is refused before httptools has buffered all of it.
        if (self._in_head and self._head_received > limits.max_header_bytes
                and not self.transport.is_closing()):
            self._refuse(431, "headers_too_large",
                         f"request headers exceed {limits.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        """Answer a parser error, or the limit that stopped the parser if one did."""
        if self._refusal is not None:  # a limit stopped the parser: answer that instead
            self._answer(*self._refusal)
            return
        self._cancel_deadline()
        super().send_400_response(msg)  # type: ignore[misc]

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """Reset the per-request counters and start the header clock."""
        super().on_message_begin()  # type: ignore[misc]
        limits = self.http_limits
        self._in_head = True
        self._header_bytes = self._header_count = self._body_bytes = 0
        self._arm(limits.header_timeout_s, "header_timeout",
                  f"request headers not received within {limits.header_timeout_s:g} s")

    def on_url(self, url: bytes) -> None:
        """Count the URL against the header cap."""
        self._header_bytes += len(url)
        self._check_head()
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count one header line against the header caps."""
        self._header_bytes += len(name) + len(value) + 4
        self._header_count += 1
        self._check_head()
        super().on_header(name, value)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        """Refuse an over-cap connection or a declared oversized body; start the body clock."""
        limits = self.http_limits
        self._in_head = False
        self._head_received = 0
        self._cancel_deadline()
        if self._over_limit:
            self._stop(503, "too_many_connections",
                       f"the server holds its maximum of {limits.max_connections} "
                       "connections; retry later")
        length = _content_length(self.headers)
        if length is not None and length > limits.max_body_bytes:
            self._stop(413, "body_too_large", f"body of {length} bytes exceeds the limit "
                       f"of {limits.max_body_bytes} bytes")
        super().on_headers_complete()  # type: ignore[misc]
        self._in_body = True
        self._arm(limits.body_timeout_s, "body_timeout",
                  f"request body not received within {limits.body_timeout_s:g} s")

    def on_body(self, body: bytes) -> None:
        """Count a body chunk against the body cap."""
        self._body_bytes += len(body)
        max_body_bytes = self.http_limits.max_body_bytes
        if self._body_bytes > max_body_bytes:
            self._stop(413, "body_too_large",
                       f"body exceeds the limit of {max_body_bytes} bytes")
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        """Stop the body clock and get ready for the next request's head."""
        self._cancel_deadline()
        self._in_head = True
        self._in_body = False
        self._head_received = 0
        super().on_message_complete()  # type: ignore[misc]

    # -- refusing ---------------------------------------------------------------------------

    def _check_head(self) -> None:
        """Stop the parser if the head has too many lines or too many bytes."""
        limits = self.http_limits
        if self._header_count > limits.max_header_count:
            self._stop(431, "too_many_headers",
                       f"more than {limits.max_header_count} request header lines")
        if self._header_bytes > limits.max_header_bytes:
            self._stop(431, "headers_too_large",
                       f"request headers exceed {limits.max_header_bytes} bytes")

    def _stop(self, status: int, kind: str, message: str) -> None:
        """Refuse from inside a parser callback (uvicorn then calls send_400_response)."""
        self._refusal = (status, kind, message)
        raise _Refused(message)

    def _refuse(self, status: int, kind: str, message: str) -> None:
        """Refuse from outside the parser (a deadline, the unparsed-head cap)."""
        self._refusal = (status, kind, message)
        self._answer(status, kind, message)

    def _answer(self, status: int, kind: str, message: str) -> None:
        """Answer ``status`` and close; a request already handed to the application is
        marked disconnected so that its own answer, if any, is never written."""
        self._cancel_deadline()
        if self.transport is None or self.transport.is_closing():
            return
        log.info("refused a request from %s: %s %s", self.client and self.client[0],
                 status, kind)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The request being read (a body refusal) or one still being answered (a
            # pipelined one before this head): its application's answer is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if cycle is not None and (cycle.response_started if self._in_body
                                  else not cycle.response_complete):
            self.transport.close()  # too late for a status line: just cut the connection
            return
        self.transport.write(_refusal_bytes(status, kind, message))
        self.transport.close()

    def _arm(self, seconds: float, kind: str, message: str) -> None:
        """Replace any pending deadline with one refusing ``408`` after ``seconds``."""
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, self._refuse, 408, kind, message)

    def _cancel_deadline(self) -> None:
        """Cancel the pending deadline, if any."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(limits: HttpLimits) -> type:
    """A uvicorn HTTP protocol class (httptools) enforcing ``limits``."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("GuardedHttpToolsProtocol", (_LimitsGuard, HttpToolsProtocol), {
        "__doc__": "uvicorn's httptools protocol with header, body, time and connection limits.",
        "__module__": __name__,
        "http_limits": limits,
    })


_REASONS = {408: b"Request Timeout", 413: b"Content Too Large",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _refusal_bytes(status: int, kind: str, message: str) -> bytes:
    body = json.dumps({"error": kind, "message": message}).encode()
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
            b"content-type: application/json", b"content-length: %d" % len(body),
            b"connection: close"]
    if status == 503:
        head.append(b"retry-after: 1")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the parser refuses it with 400
    return None


InstalledProtocol: type | None = None
"""The class :func:`install_as_uvicorn_default` made (uvicorn imports it by name)."""


def install_as_uvicorn_default(limits: HttpLimits) -> None:
    """Make every ``uvicorn.Config`` built later in this process (``http="auto"`` or
    ``"httptools"``) use :func:`guarded_protocol` of ``limits``.

    For servers whose ``uvicorn.Config`` is built by a library (BentoML's service worker).
    """
    global InstalledProtocol
    from uvicorn import config

    InstalledProtocol = guarded_protocol(limits)
    name = f"{__name__}:InstalledProtocol"
    config.HTTP_PROTOCOLS["auto"] = name
    config.HTTP_PROTOCOLS["httptools"] = name
