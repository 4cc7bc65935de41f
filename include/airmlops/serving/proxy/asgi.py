"""The ASGI plumbing the proxy's handlers share: message types, reading a request body,
answering JSON, and the error that becomes such an answer."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airmlops.serving.proxy.stats import SlotStats

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RETRY_AFTER = ((b"retry-after", b"1"),)
"""The header of a 503 the client should retry shortly."""


class ClientError(Exception):
    """An answer the proxy gives itself: ``status`` with ``{"error", "message"}``, charged to
    ``charged`` (a slot's stats; None: whatever the request was charged to) and carrying
    ``headers``."""

    def __init__(self, status: int, error: str, message: str, *,
                 charged: SlotStats | None = None,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Record the answer to give."""
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.charged, self.headers = charged, headers


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ClientError 413 beyond ``limit`` bytes, 400 if the client goes
    away."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientError(400, "client_disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ClientError(413, "body_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(send: Send, status: int, payload: Mapping[str, Any],
                    headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``status`` with ``payload`` as JSON, plus ``headers``."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: ClientError) -> None:
    """Answer the JSON error ``exc`` describes."""
    await send_json(send, exc.status, {"error": exc.error, "message": exc.message}, exc.headers)
