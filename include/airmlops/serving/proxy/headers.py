"""Which headers pass the proxy, in each direction, and which it sets itself.

Hop-by-hop headers (and those a ``Connection`` header declares so) stop at the proxy, and so does
a client's ``X-Airmlops-Shadow-Of``; the request gains ``X-Forwarded-*``, the answer its length
and ``X-Upstream-Slot``.
"""

from __future__ import annotations

from collections.abc import Sequence

from airmlops.serving.proxy.asgi import Scope
from airmlops.serving.shadow_header import SHADOW_HEADER

SLOT_HEADER = "x-upstream-slot"

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
_REPLACED = frozenset({"x-forwarded-host", "x-forwarded-proto",  # set by the proxy
                       SHADOW_HEADER.lower()})  # only a mirrored copy carries it (no forgery)


def declared_length(scope: Scope) -> int | None:
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


def proxied_request_headers(scope: Scope) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus ``X-Forwarded-*`` (Host becomes the upstream's).

    A client's ``X-Airmlops-Shadow-Of`` is dropped: only the proxy's mirror sets it.
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


def proxied_response_headers(
    raw: Sequence[tuple[bytes, bytes]], method: str, status: int, length: int, slot: bytes
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
    headers.append((SLOT_HEADER.encode(), slot))
    return headers
