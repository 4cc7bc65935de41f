"""The HTTP edge of the service: :class:`RequestGate`, the ASGI middleware that checks every
request before BentoML sees it, answers a valid ``/predict`` itself (the direct lane), gives
``/readyz`` its JSON body (:func:`readiness_body`) and times and counts requests (see
:mod:`airmlops.serving.service`)."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from airmlops.serving.schemas import describe_errors, error_body

if TYPE_CHECKING:
    from airmlops.serving.metrics import ServiceMetrics
    from airmlops.serving.predict import PredictHandler
    from airmlops.serving.prediction_log import LogStats

log = logging.getLogger("airmlops.serving.service")  # the service's logger, as before the split

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
"""Paths that answer without a token (probes and scraping)."""
PICKLE_MEDIA_TYPES = frozenset({
    "application/x-pickle", "application/python-pickle", "application/pickle",
    "application/x-python-pickle", "application/vnd.bentoml+pickle",
})
RECENT_DROP_S = 60.0
"""For this long after the prediction log dropped an entry, ``/readyz`` says ``degraded``."""


def readiness_body(ready: bool, log_stats: LogStats | None) -> dict[str, Any]:
    """The body of ``/readyz``. ``status``: ``not_ready`` when BentoML's check failed (the
    model or the online store), else ``degraded`` while the prediction log spills to disk, its
    backend fails, or it dropped entries in the last ``RECENT_DROP_S`` seconds, else ``ready``;
    ``prediction_log``: its :class:`~airmlops.serving.prediction_log.LogStats`."""
    if log_stats is None:  # the service instance is not set up yet
        return {"status": "ready" if ready else "not_ready"}
    recent_drop = log_stats.seconds_since_drop is not None and \
        log_stats.seconds_since_drop < RECENT_DROP_S
    degraded = log_stats.state != "ok" or not log_stats.backend_up or recent_drop
    status = "not_ready" if not ready else "degraded" if degraded else "ready"
    return {"status": status, "prediction_log": log_stats.to_dict()}


_KIND_BY_STATUS = {400: "bad_request", 401: "unauthorized", 404: "not_found",
                   405: "method_not_allowed", 408: "timeout", 409: "conflict",
                   413: "body_too_large",
                   415: "unsupported_media_type", 422: "unknown_entity", 429: "overloaded",
                   500: "internal", 503: "unavailable", 504: "timeout"}


Refusal = tuple[int, str, str, dict[str, Any]]
"""(HTTP status, error kind, message, extra body fields) of a request refused at the edge."""


class RequestGate:
    """ASGI middleware in front of the service's endpoints (see
    :mod:`airmlops.serving.service`).

    For ``/predict`` and ``/feedback`` it reads the body (at most ``max_body_bytes``) and
    validates it with the request models. A valid ``/predict`` is then answered here, by the
    service's :class:`~airmlops.serving.predict.PredictHandler` (the direct lane: BentoML's
    own handler would parse the body a second time and cost more than the whole prediction);
    other valid requests reach BentoML, which is handed the same bytes. BentoML's middlewares
    (its metrics, access log, timeout and concurrency limit) wrap this one, so they apply to
    both. It also times and counts every request to those endpoints, and gives ``GET /readyz``
    its JSON body (:meth:`_readyz`).
    """

    def __init__(self, app: Any, *, token: str, max_body_bytes: int, model_version: str,
                 validators: Mapping[str, type[BaseModel]],
                 metrics: Callable[[], ServiceMetrics | None],
                 predict: Callable[[], PredictHandler | None] = lambda: None,
                 log_stats: Callable[[], LogStats | None] = lambda: None) -> None:
        self.app = app
        self.log_stats = log_stats
        self.token = token.encode("utf-8") if token else b""
        self.max_body_bytes = max_body_bytes
        self.validators = dict(validators)
        self.metrics = metrics
        self.predict = predict
        self.version_header = (b"x-model-version", model_version.encode("ascii"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.validators else None
        started = time.perf_counter()
        outcome: dict[str, Any] = {"status": 500, "kind": None}

        async def send_with_version(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.version_header]
                outcome["status"] = message["status"]
            await send(message)

        try:
            refusal, body, parsed = await self._check(scope, receive, path, endpoint)
            synthetic = shadow = None
            if refusal is None and endpoint == "/predict":
                refusal, synthetic, shadow = traffic_marks(scope)
            handler = self.predict() if endpoint == "/predict" and parsed is not None else None
            if refusal is None and handler is not None:
                status, answer, headers = await self._direct(handler, parsed, synthetic, shadow)
                outcome["kind"] = _KIND_BY_STATUS.get(status, "error") if status >= 400 else None
                await _send_json(send_with_version, status, answer, headers)
            elif refusal is None and path == "/readyz" and scope["method"] == "GET":
                await self._readyz(scope, receive, send_with_version)
            elif refusal is None:
                downstream = receive if body is None else _replay(body, receive)
                await self.app(scope, downstream, send_with_version)
                status = outcome["status"]
                outcome["kind"] = _KIND_BY_STATUS.get(status, "error") if status >= 400 else None
            else:
                status, kind, message, extra = refusal
                outcome["kind"] = kind
                headers = {"WWW-Authenticate": 'Bearer realm="model"'} if status == 401 else {}
                await _send_json(send_with_version, status, error_body(kind, message, **extra),
                                 headers)
        finally:
            metrics = self.metrics()
            if endpoint is not None and metrics is not None:
                metrics.record(endpoint, outcome["status"], time.perf_counter() - started,
                               outcome["kind"])

    async def _readyz(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """BentoML's own readiness check (the service's ``__is_ready__``) gives the status
        code; its plain-text body is replaced by :func:`readiness_body`."""
        answered = {"status": 503}

        async def keep_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]

        await self.app(scope, receive, keep_status)
        status = answered["status"]
        await _send_json(send, status, readiness_body(status == 200, self.log_stats()))

    @staticmethod
    async def _direct(handler: PredictHandler, parsed: Any, synthetic: str | None,
                      shadow: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer a validated ``/predict``; an unexpected failure is a logged 500."""
        rows = [instance.model_dump(by_alias=True) for instance in parsed.instances]
        try:
            return await handler(rows, synthetic, shadow)
        except Exception:
            log.exception("Exception on /predict [POST]")
            return 500, error_body("internal", "an unexpected error occurred; see the service "
                                   "log"), {}

    async def _check(self, scope: dict[str, Any], receive: Any, path: str,
                     endpoint: str | None) -> tuple[Refusal | None, bytes | None, Any]:
        """(None, the body if it was read, the validated request if it was validated) when
        the request may pass, else (refusal, None, None)."""
        refusal = self._check_headers(scope, path, endpoint)
        if refusal is not None or endpoint is None:
            return refusal, None, None
        refusal, body = await self._read_body(receive)
        if refusal is not None:
            return refusal, None, None
        refusal, parsed = self._validate(endpoint, body)
        if refusal is not None:
            return refusal, None, None
        return None, body, parsed

    def _check_headers(self, scope: dict[str, Any], path: str,
                       endpoint: str | None) -> Refusal | None:
        """The refusal of a request by its head (token, media type, method, declared size),
        or None. Requests to other paths than ``endpoint`` only need the token and no pickle."""
        headers: dict[str, bytes] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), value)
        if self.token and path not in OPEN_PATHS:
            supplied = headers.get("authorization", b"")
            scheme, _, credentials = supplied.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(),
                                                                       self.token):
                reason = "invalid" if supplied else "missing"
                return (401, "unauthorized",
                        f"{reason} bearer token (send 'Authorization: Bearer <token>')", {})
        media_type = headers.get("content-type", b"").decode("latin-1").split(";")[0]
        media_type = media_type.strip().lower()
        if media_type in PICKLE_MEDIA_TYPES or "pickle" in media_type:
            return (415, "unsupported_media_type",
                    f"content type {media_type!r} is refused: pickled payloads are never "
                    "deserialized; send JSON (application/json)", {})
        if endpoint is None:
            return None
        if scope["method"] != "POST":
            return (405, "method_not_allowed", f"{path} accepts POST only", {})
        if media_type != "application/json":
            return (415, "unsupported_media_type",
                    f"content type {media_type or 'none'!r} is not supported; send "
                    "application/json", {})
        declared = headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return (400, "bad_request", "Content-Length is not a number", {})
            if length > self.max_body_bytes:
                return (413, "body_too_large", f"body of {length} bytes exceeds the limit "
                        f"of {self.max_body_bytes} bytes", {})
        return None

    async def _read_body(self, receive: Any) -> tuple[Refusal | None, bytes]:
        """(None, the whole body), or (a refusal, b"") when it is too large, empty or cut
        short by the client."""
        chunks = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return (400, "bad_request", "the client disconnected before the body ended",
                        {}), b""
            chunks.extend(message.get("body", b""))
            if len(chunks) > self.max_body_bytes:
                return (413, "body_too_large",
                        f"body exceeds the limit of {self.max_body_bytes} bytes", {}), b""
            if not message.get("more_body", False):
                break
        body = bytes(chunks)
        if not body.strip():
            return (400, "invalid_json", "the body is empty; send a JSON object", {}), b""
        return None, body

    def _validate(self, endpoint: str, body: bytes) -> tuple[Refusal | None, Any]:
        """(None, the request parsed by ``endpoint``'s model), or (a 400 or 422 refusal, None)
        naming what is wrong."""
        try:
            return None, self.validators[endpoint].model_validate_json(body)
        except ValidationError as error:
            problems = error.errors(include_url=False)
            if problems and problems[0]["type"] == "json_invalid":
                reason = (problems[0].get("ctx") or {}).get("error", problems[0]["msg"])
                return (400, "invalid_json", f"the body is not valid JSON: {reason}", {}), None
            detail = [{"loc": list(p["loc"]), "type": p["type"], "msg": p["msg"]}
                      for p in problems[:20]]
            return (422, "invalid_request", describe_errors(error), {"detail": detail}), None


def synthetic_kind(scope: Mapping[str, Any]) -> tuple[str | None, Refusal | None]:
    """(the kind of a request marked synthetic or None, None), or (None, a 400 refusal) when
    the mark names no known kind (:mod:`airmlops.serving.synthetic`)."""
    from airmlops.serving.synthetic import SYNTHETIC_HEADER, SYNTHETIC_KINDS

    name = SYNTHETIC_HEADER.lower().encode("latin-1")
    for header, value in scope.get("headers", []):
        if header.lower() == name:
            kind = value.decode("latin-1").strip()
            if kind in SYNTHETIC_KINDS:
                return kind, None
            return None, (400, "invalid_header",
                          f"{SYNTHETIC_HEADER}: {kind[:40]!r} is not a synthetic traffic kind; "
                          f"expected one of {list(SYNTHETIC_KINDS)}", {})
    return None, None


def shadow_of(scope: Mapping[str, Any]) -> tuple[str | None, Refusal | None]:
    """(the live request id a shadow request copies or None, None), or (None, a 400 refusal)
    when the mark is not 32 lowercase hex digits (:mod:`airmlops.serving.shadow_header`)."""
    from airmlops.serving.prediction_log.records import REQUEST_ID_PATTERN
    from airmlops.serving.shadow_header import SHADOW_HEADER

    name = SHADOW_HEADER.lower().encode("latin-1")
    for header, value in scope.get("headers", []):
        if header.lower() == name:
            live_id = value.decode("latin-1").strip()
            if REQUEST_ID_PATTERN.fullmatch(live_id):
                return live_id, None
            return None, (400, "invalid_header",
                          f"{SHADOW_HEADER}: {live_id[:40]!r} is not a request id; expected "
                          "the live answer's request id, 32 lowercase hex digits", {})
    return None, None


def traffic_marks(scope: Mapping[str, Any]) -> tuple[Refusal | None, str | None, str | None]:
    """(None, the synthetic kind or None, the shadowed live request id or None) of a
    ``/predict``, or (a 400 refusal, None, None) when a mark is malformed or the request is
    marked both synthetic and shadow (a mirrored copy of a synthetic request never exists)."""
    from airmlops.serving.shadow_header import SHADOW_HEADER
    from airmlops.serving.synthetic import SYNTHETIC_HEADER

    synthetic, refusal = synthetic_kind(scope)
    if refusal is not None:
        return refusal, None, None
    shadow, refusal = shadow_of(scope)
    if refusal is not None:
        return refusal, None, None
    if synthetic is not None and shadow is not None:
        return (400, "invalid_header", f"{SYNTHETIC_HEADER} and {SHADOW_HEADER} exclude each "
                "other: a request is synthetic or a shadow copy of a live one, not both",
                {}), None, None
    return None, synthetic, shadow


async def _send_json(send: Any, status: int, body: Mapping[str, Any],
                     headers: Mapping[str, str] | None = None) -> None:
    """Answer with a JSON body straight on the ASGI ``send`` (no Response object)."""
    content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(content)).encode("ascii"))]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def _replay(body: bytes, receive: Any) -> Callable[[], Any]:
    """A ``receive`` that hands over the already-read body once, then the client's events."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
