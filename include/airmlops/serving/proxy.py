"""The stable address of a deployed model: a small reverse proxy with an atomic upstream switch.

Clients call one address that never changes between model versions; blue/green deploys start
the new version beside the old one and then tell this proxy to send new requests there.
It needs nothing but the Python environment, so the embedded default works without nginx or
Traefik: uvicorn (httptools, uvloop) serves it and a lean keep-alive client
(:mod:`airmlops.serving.upstream`, httptools again) talks to the upstreams. That client rather
than aiohttp's, which spent ~65 % of the proxy's CPU per request (benchmarks/README.md), or
httpx's AsyncClient, slower still.

* every request (method, path, query, body, end-to-end headers) goes to the ACTIVE upstream,
  read once when the request arrives: a switch changes where NEW requests go, while requests
  already in flight finish on the upstream they started on, so a switch fails no request;
* the answer carries ``X-Upstream-Slot`` (which slot served it); an unreachable upstream gives a
  JSON 502 (504 on a timeout, 503 when nothing is deployed yet);
* ``/__proxy/`` is the admin prefix, never forwarded: ``GET /__proxy/healthz``,
  ``GET /__proxy/state``, and ``POST /__proxy/switch`` with
  ``{"upstream": "http://127.0.0.1:PORT", "slot": "blue"}`` and
  ``Authorization: Bearer <token>``. The token is random, kept with mode 0600 in the state
  directory (:func:`ensure_admin_token`); the switch checks the new upstream's ``/readyz``
  first (unless ``"verify": false``) and persists the choice, so a restarted proxy resumes it.

Clients are held to :class:`~airmlops.serving.http_limits.HttpLimits` before anything is
forwarded: oversized headers 431, oversized bodies 413, slow headers or bodies 408, a request on
a connection beyond ``--max-connections`` 503, idle connections closed after ``--keep-alive``.

Upstreams must be loopback addresses, and the proxy itself binds 127.0.0.1 only.
Run it as ``python -m airmlops.serving.proxy --port N --state-dir D``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airmlops.serving.http_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADER_COUNT,
    HttpLimits,
    guarded_protocol,
)

if TYPE_CHECKING:
    from airmlops.serving.upstream import UpstreamPool

logger = logging.getLogger("airmlops.serving.proxy")

HOST = "127.0.0.1"
ADMIN_PREFIX = "/__proxy/"
SLOT_HEADER = "x-upstream-slot"
TOKEN_FILE = "admin-token"  # noqa: S105 (a file name, not a secret)
STATE_FILE = "proxy-state.json"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 60.0
KEEPALIVE_EXPIRY = 2.0
"""Idle upstream connections are dropped after this many seconds: shorter than the upstream's
own keep-alive timeout (uvicorn's and BentoML's default is 5 s), so the proxy never sends a
request on a connection the upstream is closing."""

_SLOT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"content-length", "expect"}
_REPLACED = frozenset({"x-forwarded-host", "x-forwarded-proto"})  # set by the proxy
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --------------------------------------------------------------------------------------------
# Validation and the admin token (shared by the server and its clients)
# --------------------------------------------------------------------------------------------


def validate_upstream(url: str) -> str:
    """Return ``url`` normalised to ``http://<loopback>:<port>`` or raise ValueError.

    Only plain http to a loopback address with an explicit port, and nothing else (no path,
    query, credentials): the proxy must never be pointed at another machine.
    """
    if not isinstance(url, str) or len(url) > 64:
        raise ValueError(f"invalid upstream {url!r}")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid upstream {url!r}: bad port") from None
    if (
        parts.scheme != "http"
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or port is None
        or not 0 < port < 65536
        or parts.hostname is None
    ):
        raise ValueError(f"invalid upstream {url!r}: expected http://127.0.0.1:PORT")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"upstream {url!r} is not a loopback address")
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"http://{netloc}"


def validate_slot(slot: str) -> str:
    """Return ``slot`` if it is a short lowercase name (``blue``, ``green``); else ValueError."""
    if not isinstance(slot, str) or not _SLOT_RE.fullmatch(slot):
        raise ValueError(f"invalid slot name {slot!r}")
    return slot


def validate_port(port: int) -> int:
    """Return ``port`` if it is an int in 1..65535; else ValueError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    return port


def ensure_admin_token(state_dir: Path) -> str:
    """The proxy's admin token, created once (random, file mode 0600) in ``state_dir``.

    Both the proxy and whoever drives it call this; the first creates the file (exclusively,
    so two callers racing agree on one token).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(path, 0o600)
    token = path.read_text().strip()
    if len(token) < 32:
        raise ValueError(f"admin token file {path} is empty or truncated; delete it to renew")
    return token


# --------------------------------------------------------------------------------------------
# The proxy (an ASGI application served by uvicorn)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where requests go: the base URL and the slot name reported in ``X-Upstream-Slot``."""

    url: str
    slot: str

    @functools.cached_property
    def address(self) -> tuple[str, int]:
        """(host, port) of :attr:`url` (validated by :func:`validate_upstream`)."""
        parts = urlsplit(self.url)
        return parts.hostname or HOST, parts.port or 80


class _ClientError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class ReverseProxy:
    """The ASGI proxy. ``self.upstream`` is replaced (never mutated) by a switch, so each
    request uses the upstream it read on arrival: a single reference read is atomic here."""

    def __init__(
        self,
        state_dir: Path,
        *,
        upstream: Upstream | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_connections: int = 256,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.token = ensure_admin_token(self.state_dir)
        self.upstream = upstream if upstream is not None else load_persisted_upstream(state_dir)
        self.generation = 0
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.counters = {"requests": 0, "upstream_errors": 0, "retries": 0, "switches": 0}
        self._pool: UpstreamPool | None = None
        self._switch_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    # -- ASGI entry point -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets are not proxied
            return
        path: str = scope["path"]
        try:
            if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
                await self._admin(scope, receive, send)
            else:
                await self._forward(scope, receive, send)
        except _ClientError as exc:
            await _send_json(send, exc.status, {"error": exc.error, "message": exc.message})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._pool = self._make_pool()
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
                _freeze_startup_objects()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sweeper is not None:
                    self._sweeper.cancel()
                if self._pool is not None:
                    await self._pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _make_pool(self) -> UpstreamPool:
        # Only the client's own headers are forwarded (no User-Agent or Accept of the proxy's),
        # bodies pass byte for byte (no decompression), no cookie is kept between clients, and
        # no environment proxy is ever used: the pool speaks to loopback upstreams only. One
        # timer per request bounds the whole answer (read_timeout).
        from airmlops.serving.upstream import UpstreamPool

        return UpstreamPool(limit=self.max_connections, keepalive_expiry=KEEPALIVE_EXPIRY,
                            connect_timeout=self.connect_timeout)

    async def _sweep(self) -> None:
        """Close idle upstream connections past their expiry, so none lingers half-closed."""
        while True:
            await asyncio.sleep(KEEPALIVE_EXPIRY)
            if self._pool is not None:
                self._pool.drop_expired()

    @property
    def pool(self) -> UpstreamPool:
        if self._pool is None:  # served without lifespan (e.g. an ASGI test transport)
            self._pool = self._make_pool()
        return self._pool

    # -- forwarding ---------------------------------------------------------------------------

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        from airmlops.serving.upstream import (
            UpstreamClosedError,
            UpstreamConnectError,
            UpstreamError,
        )

        self.counters["requests"] += 1
        upstream = self.upstream
        if upstream is None:
            raise _ClientError(
                503, "no_upstream", "no model version is deployed behind this address"
            )
        method: str = scope["method"]
        declared_length = _declared_length(scope)
        if declared_length is not None and declared_length > self.max_body_bytes:
            raise _ClientError(
                413, "body_too_large", f"request body exceeds {self.max_body_bytes} bytes"
            )
        body = await _read_body(receive, self.max_body_bytes)
        headers = _request_headers(scope)
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")

        attempt = 0
        while True:
            host, port = upstream.address
            try:
                response = await self.pool.request(
                    host,
                    port,
                    method,
                    target,
                    headers,
                    body if body or method not in _IDEMPOTENT else None,
                    timeout=self.read_timeout,
                )
                content, status, raw_headers = response.body, response.status, response.headers
                break
            except UpstreamConnectError as exc:
                # Nothing reached the upstream: safe to try once more, on the upstream that is
                # active now (it may just have been switched away from a stopped one).
                error: Exception = exc
                retry = attempt == 0
            except UpstreamClosedError as exc:
                # An idle keep-alive connection the upstream closed as the request went out:
                # an idempotent request is sent once more on a fresh connection.
                error = exc
                retry = attempt == 0 and exc.reused and method in _IDEMPOTENT
            except TimeoutError as exc:
                self.counters["upstream_errors"] += 1
                logger.warning("upstream %s (%s) timed out: %r", upstream.url, upstream.slot, exc)
                raise _ClientError(
                    504,
                    "gateway_timeout",
                    f"the model service in slot {upstream.slot} did "
                    f"not answer within {self.read_timeout:g} s",
                ) from None
            except UpstreamError as exc:  # an invalid or cut-off answer
                error, retry = exc, False
            if not retry:
                self.counters["upstream_errors"] += 1
                logger.warning("upstream %s (%s) failed: %r", upstream.url, upstream.slot, error)
                raise _ClientError(
                    502,
                    "bad_gateway",
                    f"the model service in slot {upstream.slot} could not be reached "
                    f"({type(error).__name__})",
                ) from None
            attempt += 1
            self.counters["retries"] += 1
            upstream = self.upstream or upstream

        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": _response_headers(raw_headers, method, status, len(content), upstream),
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else content})

    # -- admin --------------------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/__proxy/healthz" and method in ("GET", "HEAD"):
            await _send_json(send, 200, {"status": "ok"})
        elif path == "/__proxy/state" and method == "GET":
            await _send_json(send, 200, self.state())
        elif path == "/__proxy/switch" and method == "POST":
            self._authenticate(scope)
            body = await _read_body(receive, 4096)
            await _send_json(send, 200, await self._switch(body))
        elif path in ("/__proxy/healthz", "/__proxy/state", "/__proxy/switch"):
            raise _ClientError(405, "method_not_allowed", f"{method} is not allowed on {path}")
        else:
            raise _ClientError(404, "not_found", f"no admin endpoint {path}")

    def state(self) -> dict[str, Any]:
        """What ``GET /__proxy/state`` answers: the active upstream and counters."""
        upstream = self.upstream
        return {
            "upstream": upstream.url if upstream else None,
            "slot": upstream.slot if upstream else None,
            "generation": self.generation,
            **self.counters,
        }

    def _authenticate(self, scope: Scope) -> None:
        supplied = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credential = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    supplied = credential.strip()
        if not supplied or not hmac.compare_digest(supplied.encode(), self.token.encode()):
            raise _ClientError(401, "unauthorized", "a valid admin bearer token is required")

    async def _switch(self, body: bytes) -> dict[str, Any]:
        try:
            request = json.loads(body or b"null")
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            upstream = Upstream(
                url=validate_upstream(request.get("upstream")),
                slot=validate_slot(request.get("slot")),
            )
            verify = request.get("verify", True)
            if not isinstance(verify, bool):
                raise ValueError("'verify' must be a boolean")
        except (ValueError, UnicodeDecodeError) as exc:
            raise _ClientError(400, "bad_request", f"invalid switch request: {exc}") from None
        async with self._switch_lock:
            if verify:
                await self._check_ready(upstream)
            previous = self.upstream
            persist_upstream(self.state_dir, upstream)
            self.upstream = upstream  # the switch: one reference assignment
            self.generation += 1
            self.counters["switches"] += 1
        logger.info("switched to %s (%s)", upstream.url, upstream.slot)
        return {
            "upstream": upstream.url,
            "slot": upstream.slot,
            "previous": dataclasses.asdict(previous) if previous else None,
            "generation": self.generation,
        }

    async def _check_ready(self, upstream: Upstream) -> None:
        from airmlops.serving.upstream import UpstreamError

        host, port = upstream.address
        try:
            response = await self.pool.request(host, port, "GET", "/readyz", [], None,
                                               timeout=5.0)
            status = response.status
        except (UpstreamError, TimeoutError) as exc:
            raise _ClientError(
                409, "upstream_not_ready", f"{upstream.url} is not reachable: {exc!r}"
            ) from None
        if status != 200:
            raise _ClientError(
                409, "upstream_not_ready", f"{upstream.url}/readyz answered {status}"
            )


def _freeze_startup_objects() -> None:
    """Keep what is loaded at startup out of later garbage collections: a full collection walks
    every tracked object, and a request in flight waits for it (see the model service's
    ``freeze_startup_objects``)."""
    import gc

    gc.collect()
    gc.freeze()


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientError(400, "client_disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _ClientError(413, "body_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, if it sent a valid one."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _connection_tokens(values: Sequence[str]) -> frozenset[str]:
    """Header names a ``Connection`` header declares hop-by-hop."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def _request_headers(scope: Scope) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus ``X-Forwarded-*`` (Host becomes the upstream's).

    ``Expect`` is answered by the proxy's own server (it has the whole body before
    forwarding), so it is not passed on either."""
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    declared = _connection_tokens(
        [value.decode("latin-1") for name, value in raw if name == b"connection"]
    )
    headers: list[tuple[str, str]] = []
    host = ""
    forwarded_for = ""
    for raw_name, raw_value in raw:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        lowered = name.lower()
        if lowered in _NOT_FORWARDED or lowered in declared or lowered in _REPLACED:
            continue
        if lowered == "host":
            host = value
        elif lowered == "x-forwarded-for":
            forwarded_for = value
        else:
            headers.append((name, value))
    client = scope.get("client")
    if client:
        forwarded_for = f"{forwarded_for}, {client[0]}" if forwarded_for else client[0]
    if forwarded_for:
        headers.append(("X-Forwarded-For", forwarded_for))
    if host:
        headers.append(("X-Forwarded-Host", host))
    headers.append(("X-Forwarded-Proto", scope.get("scheme", "http")))
    return headers


def _response_headers(
    raw: Sequence[tuple[bytes, bytes]], method: str, status: int, length: int, upstream: Upstream
) -> list[tuple[bytes, bytes]]:
    """The upstream's end-to-end headers, the body's length and ``X-Upstream-Slot``."""
    declared = _connection_tokens(
        [value.decode("latin-1") for name, value in raw if name.lower() == b"connection"]
    )
    # HEAD keeps the upstream's Content-Length (of the body it omits); 1xx/204/304 have none.
    keep_length = method == "HEAD" or status < 200 or status in (204, 304)
    headers = [
        (name, value)
        for name, value in raw
        if (lowered := name.decode("latin-1").lower()) not in _HOP_BY_HOP
        and lowered not in declared
        and lowered != SLOT_HEADER
        and (keep_length or lowered != "content-length")
    ]
    if not keep_length:
        headers.append((b"content-length", str(length).encode()))
    headers.append((SLOT_HEADER.encode(), upstream.slot.encode()))
    return headers


async def _send_json(send: Send, status: int, payload: Mapping[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# Persisted choice (a restarted proxy resumes the last upstream it was switched to)
# --------------------------------------------------------------------------------------------


def persist_upstream(state_dir: Path, upstream: Upstream) -> None:
    """Record the active upstream in ``state_dir`` (atomic write)."""
    from airmlops.paths import atomic_write_json

    atomic_write_json(Path(state_dir) / STATE_FILE, dataclasses.asdict(upstream))


def load_persisted_upstream(state_dir: Path) -> Upstream | None:
    """The upstream last persisted in ``state_dir``, or None (missing or invalid file)."""
    try:
        data = json.loads((Path(state_dir) / STATE_FILE).read_text())
        return Upstream(url=validate_upstream(data["url"]), slot=validate_slot(data["slot"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Client side: what a deploy calls
# --------------------------------------------------------------------------------------------


class ProxyAdminError(RuntimeError):
    """The proxy refused or failed an admin call; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def proxy_url(port: int) -> str:
    """The stable address of the proxy on ``port``."""
    return f"http://{HOST}:{validate_port(port)}"


def healthz(port: int, timeout: float = 2.0) -> bool:
    """True when a proxy answers ``/__proxy/healthz`` on ``port``; never raises."""
    import httpx

    try:
        response = httpx.get(f"{proxy_url(port)}/__proxy/healthz", timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def get_state(port: int, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /__proxy/state`` of the proxy on ``port``."""
    import httpx

    try:
        response = httpx.get(f"{proxy_url(port)}/__proxy/state", timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise ProxyAdminError(f"proxy on port {port} did not answer: {exc!r}") from None
    if response.status_code != 200:
        raise ProxyAdminError(f"proxy state answered {response.status_code}", response.status_code)
    return response.json()


def switch(
    port: int, token: str, upstream: str, slot: str, *, verify: bool = True, timeout: float = 10.0
) -> dict[str, Any]:
    """Point the proxy on ``port`` at ``upstream`` (served as ``slot``); return its answer.

    With ``verify`` the proxy first checks the upstream's ``/readyz`` and refuses (409) if it
    is not ready. Raises :class:`ProxyAdminError` on any refusal or failure.
    """
    import httpx

    payload = {
        "upstream": validate_upstream(upstream),
        "slot": validate_slot(slot),
        "verify": verify,
    }
    try:
        response = httpx.post(
            f"{proxy_url(port)}/__proxy/switch",
            json=payload,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise ProxyAdminError(f"proxy on port {port} did not answer the switch: {exc!r}") from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise ProxyAdminError(
            f"proxy refused the switch ({response.status_code}): {message}", response.status_code
        )
    return response.json()


# --------------------------------------------------------------------------------------------
# Process entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airmlops.serving.proxy",
        description="Reverse proxy giving a deployed model one stable address on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="holds the admin token and the last switch"
    )
    parser.add_argument("--upstream", help="initial upstream (else the persisted one, if any)")
    parser.add_argument("--slot", default=None, help="slot name of --upstream")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT)
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                        help="most seconds an upstream answer may take (then 504)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body (413 above)")
    parser.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                        help="largest request line plus headers (431 above)")
    parser.add_argument("--max-header-count", type=int, default=DEFAULT_MAX_HEADER_COUNT,
                        help="most request header lines (431 above)")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a client has to send its headers (then 408)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a client has to send its body after the headers (408)")
    parser.add_argument("--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE_S,
                        help="seconds an idle client connection is kept open")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open client connections; a request on one beyond gets 503")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        port = validate_port(args.port)
        limits = HttpLimits(
            max_header_bytes=args.max_header_bytes, max_header_count=args.max_header_count,
            max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
            max_connections=args.max_connections,
        )
        initial = None
        if args.upstream:
            initial = Upstream(
                validate_upstream(args.upstream), validate_slot(args.slot or "initial")
            )
    except ValueError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 2
    proxy = ReverseProxy(
        args.state_dir,
        upstream=initial,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    if initial is not None:
        persist_upstream(args.state_dir, initial)
    current = proxy.upstream
    logger.info(
        "proxy on %s -> %s", proxy_url(port), f"{current.url} ({current.slot})" if current else "-"
    )
    config = uvicorn.Config(
        proxy,
        http=guarded_protocol(limits),
        host=HOST,
        port=port,
        lifespan="on",
        access_log=args.access_log,
        log_level="info",
        server_header=False,
        date_header=False,  # the upstream's Date is passed through
        proxy_headers=False,
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=15,
        backlog=2048,
    )
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
