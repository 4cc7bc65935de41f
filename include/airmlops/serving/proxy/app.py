"""The proxy itself: an ASGI application served by uvicorn that forwards each request to an
upstream the :class:`~airmlops.serving.proxy.routing.Router` picks, retries an attempt that
never got an answer, checks every upstream's health, and serves the admin endpoints.

The rules it follows are in the package docstring (:mod:`airmlops.serving.proxy`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.serving.proxy.admin import (
    ADMIN_BODY_LIMIT,
    ENDPOINTS,
    authenticate,
    is_admin_path,
    parse_canary,
    parse_register,
    parse_shadow,
    parse_switch,
    render_metrics,
    render_state,
    switch_answer,
)
from airmlops.serving.proxy.asgi import (
    RETRY_AFTER,
    ClientError,
    Receive,
    Scope,
    Send,
    read_body,
    send_error,
    send_json,
)
from airmlops.serving.proxy.canary import CANARY_PATH
from airmlops.serving.proxy.headers import (
    declared_length,
    proxied_request_headers,
    proxied_response_headers,
)
from airmlops.serving.proxy.routing import (
    Backend,
    Router,
    address,
    readiness_error,
)
from airmlops.serving.proxy.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_READ_TIMEOUT,
    HEALTH_FALL,
    HEALTH_TIMEOUT,
    KEEPALIVE_EXPIRY,
    VERIFY_TIMEOUT,
)
from airmlops.serving.proxy.shadow import SHADOW_QUEUE_SIZE, SHADOW_WORKERS, Mirror
from airmlops.serving.proxy.table import (
    MAX_SLOTS,
    RoutingTable,
    load_persisted_table,
    persist_table,
)
from airmlops.serving.proxy.validation import ensure_admin_token

if TYPE_CHECKING:
    from collections.abc import Callable

    from airmlops.serving.proxy.table import CanarySpec, ShadowSpec
    from airmlops.serving.upstream import Response, UpstreamPool

logger = logging.getLogger("airmlops.serving.proxy")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ReverseProxy:
    """The ASGI proxy. Routing state lives in ``self.router``, whose route is replaced (never
    mutated) on every change, so each request routes by what it read on arrival."""

    def __init__(
        self,
        state_dir: Path,
        *,
        table: RoutingTable | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_connections: int = 256,
        health_interval: float = DEFAULT_HEALTH_INTERVAL,
        shadow_queue_size: int = SHADOW_QUEUE_SIZE,
        shadow_workers: int = SHADOW_WORKERS,
    ) -> None:
        """A proxy keeping its token and table in ``state_dir``, routing by ``table`` (the
        persisted one when None), mirroring to a shadow through ``shadow_workers`` workers and
        a queue of ``shadow_queue_size`` copies."""
        self.state_dir = Path(state_dir)
        self.token = ensure_admin_token(self.state_dir)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.health_interval = health_interval
        self.boot = secrets.token_hex(8)
        self.generation = 0
        self.counters = {"requests": 0, "upstream_errors": 0, "retries": 0, "switches": 0,
                         "failovers": 0, "unavailable": 0}
        self.router = Router(table if table is not None else load_persisted_table(self.state_dir))
        self._pool: UpstreamPool | None = None
        self._switch_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.mirror = Mirror(self.router, self.counters, lambda: self.pool, read_timeout,
                             queue_size=shadow_queue_size, workers=shadow_workers)

    # -- ASGI entry point and lifespan ----------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope: lifespan, admin or forwarded HTTP."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets are not proxied
            return
        if is_admin_path(scope["path"]):
            try:
                await self._admin(scope, receive, send)
            except ClientError as exc:
                await send_error(send, exc)
        else:
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Start the upstream pool and the background tasks (health checks, the shadow's
        workers); stop them at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._pool = self._make_pool()
                loop = asyncio.get_running_loop()
                self._tasks = [loop.create_task(self._sweep()),
                               loop.create_task(self._check_health()), *self.mirror.start()]
                _freeze_startup_objects()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in self._tasks:
                    task.cancel()
                if self._pool is not None:
                    await self._pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _make_pool(self) -> UpstreamPool:
        """The keep-alive client to the upstreams.

        Only the client's own headers are forwarded (no User-Agent or Accept of the proxy's),
        bodies pass byte for byte (no decompression), no cookie is kept between clients, and no
        environment proxy is ever used: the pool speaks to loopback upstreams only. One timer
        per request bounds the whole answer (read_timeout)."""
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
        """The upstream pool, made on first use when served without lifespan (e.g. an ASGI
        test transport)."""
        if self._pool is None:
            self._pool = self._make_pool()
        return self._pool

    async def _check_health(self) -> None:
        """Ask every upstream of every slot for ``/readyz``, every ``health_interval`` s."""
        router = self.router
        while True:
            await asyncio.sleep(self.health_interval)
            backends = [backend for slot in router.backends.values() for backend in slot]
            try:
                errors = await asyncio.gather(
                    *(readiness_error(b.host, b.port, HEALTH_TIMEOUT) for b in backends))
            except Exception:  # a bug here must not stop the checks for good
                logger.exception("health check round failed")
                continue
            for backend, error in zip(backends, errors, strict=True):
                router.mark(backend, error, fall=HEALTH_FALL)

    # -- forwarding ---------------------------------------------------------------------------

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request and send its answer, charging it to a slot's statistics; then
        offer it to the shadow, if one is set (:mod:`.shadow`)."""
        started = time.perf_counter()
        counters = self.counters
        counters["requests"] += 1
        router = self.router
        route = router.route
        charged = route.owner  # the slot whose statistics this answer counts in
        body: bytes | None = None  # read first only to split a canary's traffic or mirror it
        canary, shadow = router.canary, router.shadow
        try:
            if canary is not None or shadow is not None:
                if scope["path"] == CANARY_PATH and scope["method"] == "POST":
                    body = await self._read_body(scope, receive)
                    if canary is not None and canary.takes(body):
                        route = canary.route
                        charged = route.owner
                else:
                    shadow = None  # only POST /predict is mirrored
            backend = router.pick(route.candidates)
            if backend is None:
                counters["unavailable"] += 1
                raise ClientError(
                    503, "no_upstream" if route.mode == "empty" else "no_healthy_upstream",
                    route.message, headers=RETRY_AFTER)
            if route.failover:
                counters["failovers"] += 1
            method: str = scope["method"]
            if body is None:  # inline, as before canaries: no extra call on the common path
                length = declared_length(scope)
                if length is not None and length > self.max_body_bytes:
                    raise ClientError(
                        413, "body_too_large", f"request body exceeds {self.max_body_bytes} bytes"
                    )
                body = await read_body(receive, self.max_body_bytes)
            target, headers = _target(scope), proxied_request_headers(scope)
            response, backend = await self._exchange(
                backend, method, target, headers,
                body if body or method not in _IDEMPOTENT else None)
            charged = backend.stats
            status, content = response.status, response.body
            await send({
                "type": "http.response.start",
                "status": status,
                "headers": proxied_response_headers(response.headers, method, status,
                                                    len(content), backend.slot_header),
            })
            await send({"type": "http.response.body",
                        "body": b"" if method == "HEAD" else content})
            if shadow is not None and status == 200:  # after the live answer, never before
                self.mirror.offer(shadow, response.headers, target, headers, body or b"")
        except ClientError as exc:
            if exc.charged is not None:
                charged = exc.charged
            status = exc.status
            await send_error(send, exc)
        charged.record(status, time.perf_counter() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request's body, at most ``max_body_bytes`` (else ClientError 413)."""
        length = declared_length(scope)
        if length is not None and length > self.max_body_bytes:
            raise ClientError(
                413, "body_too_large", f"request body exceeds {self.max_body_bytes} bytes")
        return await read_body(receive, self.max_body_bytes)

    async def _exchange(self, backend: Backend, method: str, target: str,
                        headers: list[tuple[str, str]], body: bytes | None
                        ) -> tuple[Response, Backend]:
        """Send the request to ``backend``, again if it never got an answer (the retry rule
        of the package docstring); return the answer and the upstream that gave it."""
        from airmlops.serving.upstream import (
            UpstreamClosedError,
            UpstreamConnectError,
            UpstreamError,
        )

        router = self.router
        moved = False  # the one retry on another upstream is spent
        refreshed = False  # the same upstream was tried again on a fresh connection
        while True:
            try:
                response = await self.pool.request(backend.host, backend.port, method, target,
                                                   headers, body, timeout=self.read_timeout)
                return response, backend
            except UpstreamConnectError as exc:
                # Nothing reached it: it is down (passively), and another may take the request.
                router.mark(backend, f"{type(exc).__name__}: {exc}", fall=1)
                error: Exception = exc
                alternative = None if moved else router.alternative(backend)
            except UpstreamClosedError as exc:
                # Closed before any answer: the worker died with the request, or an idle
                # keep-alive connection was closed as the request went out. In that second
                # case the same upstream may take it on a fresh connection (once) when no
                # other can; if it turns out to be gone, the connect error still moves on.
                error = exc
                alternative = None if moved else router.alternative(backend)
                if alternative is None and exc.reused and not refreshed:
                    alternative, refreshed = backend, True
            except TimeoutError:
                raise self._upstream_failed(
                    backend, 504, "gateway_timeout",
                    f"did not answer within {self.read_timeout:g} s", "timed out") from None
            except UpstreamError as exc:  # an invalid or cut-off answer
                error, alternative = exc, None
            if alternative is None:
                raise self._upstream_failed(
                    backend, 502, "bad_gateway",
                    f"could not be reached ({type(error).__name__})", f"failed: {error!r}")
            self._count_retry(backend, alternative)
            moved = moved or alternative is not backend
            backend = alternative

    def _upstream_failed(self, backend: Backend, status: int, error: str, what: str,
                         logged: str) -> ClientError:
        """Count and log a request ``backend`` failed; the 502/504 answer to give."""
        self.counters["upstream_errors"] += 1
        logger.warning("upstream %s (%s) %s", backend.url, backend.slot, logged)
        return ClientError(status, error, f"the model service in slot {backend.slot} {what}",
                           charged=backend.stats)

    def _count_retry(self, backend: Backend, alternative: Backend) -> None:
        """Count a retry on ``alternative`` after ``backend`` failed (a failover too when it
        leaves the route's candidates or the slot)."""
        self.counters["retries"] += 1
        if alternative is backend:
            return
        route = self.router.route
        if route.failover or alternative.slot != backend.slot or alternative in route.fallbacks:
            self.counters["failovers"] += 1

    # -- admin --------------------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one admin endpoint; ClientError for a refused request."""
        path, method = scope["path"], scope["method"]
        if path in ("/__proxy/livez", "/__proxy/healthz") and method in ("GET", "HEAD"):
            await self._health(send, path)
        elif path == "/__proxy/state" and method == "GET":
            await send_json(send, 200, self.state())
        elif path == "/__proxy/metrics" and method == "GET":
            body = self.metrics().encode()
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", _METRICS_TYPE), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif path in ("/__proxy/switch", "/__proxy/register") and method == "POST":
            authenticate(scope, self.token)
            body = await read_body(receive, ADMIN_BODY_LIMIT)
            change = self._switch if path == "/__proxy/switch" else self._register
            await send_json(send, 200, await change(body))
        elif path == "/__proxy/canary" and method == "POST":
            authenticate(scope, self.token)
            await send_json(send, 200, await self._canary(await read_body(
                receive, ADMIN_BODY_LIMIT)))
        elif path == "/__proxy/shadow" and method == "POST":
            authenticate(scope, self.token)
            await send_json(send, 200, await self._shadow(await read_body(
                receive, ADMIN_BODY_LIMIT)))
        elif path in ENDPOINTS:
            raise ClientError(405, "method_not_allowed", f"{method} is not allowed on {path}")
        else:
            raise ClientError(404, "not_found", f"no admin endpoint {path}")

    async def _health(self, send: Send, path: str) -> None:
        """Answer ``/__proxy/livez`` (the process runs) or ``/__proxy/healthz`` (a request
        would be routed)."""
        route = self.router.route
        if path == "/__proxy/livez":
            await send_json(send, 200, {"status": "alive"})
        elif route.candidates:
            await send_json(send, 200, {"status": "ok"})
        else:
            status = "empty" if route.mode == "empty" else "unavailable"
            await send_json(send, 503, {"status": status, "message": route.message},
                            RETRY_AFTER)

    def state(self) -> dict[str, Any]:
        """What ``GET /__proxy/state`` answers: the table with health, counters and stats."""
        return render_state(self.router, self.counters, self.generation, self.boot,
                            self.mirror.budget.rate)

    def metrics(self) -> str:
        """What ``GET /__proxy/metrics`` answers (Prometheus text format 0.0.4)."""
        return render_metrics(self.router, self.counters)

    async def _switch(self, body: bytes) -> dict[str, Any]:
        """Make the slot ``body`` describes active, after checking its upstreams unless told
        not to (409 when none is ready)."""
        request = parse_switch(body)
        urls = request.spec.upstreams
        async with self._switch_lock:
            checked: dict[str, str | None] = {}
            if request.verify:
                errors = await asyncio.gather(
                    *(readiness_error(*address(url), VERIFY_TIMEOUT) for url in urls))
                checked = dict(zip(urls, errors, strict=True))
                if all(error is not None for error in errors):
                    raise ClientError(409, "upstream_not_ready", "; ".join(
                        f"{url} is not ready: {error}" for url, error in checked.items()))
            previous = self.router.table
            table = self._change(previous.with_slot(request.slot, request.spec, activate=True),
                                 checked)
            self.counters["switches"] += 1
        logger.info("switched to slot %s (version %s): %s", request.slot, request.spec.version,
                    ", ".join(urls))
        return switch_answer(request, previous, table, checked, self.generation)

    async def _register(self, body: bytes) -> dict[str, Any]:
        """Record (or, without upstreams, remove) the inactive slot ``body`` describes."""
        request = parse_register(body)
        slot, spec = request.slot, request.spec
        async with self._switch_lock:
            previous = self.router.table
            if slot == previous.active:
                raise ClientError(
                    409, "slot_active",
                    f"slot {slot} is active: switch to another slot before "
                    + ("removing it" if spec is None else "changing it (or switch to it again)"))
            if spec is not None:
                table = self._change(previous.with_slot(slot, spec, activate=False))
            elif slot in previous.slots:
                table = self._change(previous.without_slot(slot))
            else:
                table = previous
        urls = list(spec.upstreams) if spec is not None else []
        if table is not previous:
            logger.info("registered slot %s (version %s): %s", slot, request.version,
                        ", ".join(urls) or "removed")
        return {"slot": slot, "version": request.version, "upstreams": urls,
                "removed": spec is None and slot in previous.slots,
                "active": table.active, "generation": self.generation}

    async def _canary(self, body: bytes) -> dict[str, Any]:
        """Set (or, with ``"slot": null``, clear) the canary ``body`` describes; 409 when its
        slot is not a registered slot other than the active one."""
        canary = parse_canary(body)
        return await self._set_trial(
            "canary", canary, lambda table: table.with_canary(canary),
            f"slot {canary.slot} at {canary.weight} % by {canary.entity_key}" if canary else "")

    async def _shadow(self, body: bytes) -> dict[str, Any]:
        """Set (or, with ``"slot": null``, clear) the shadow ``body`` describes; 409 when its
        slot is not a registered slot other than the active and the canary's."""
        shadow = parse_shadow(body)
        return await self._set_trial(
            "shadow", shadow, lambda table: table.with_shadow(shadow),
            f"slot {shadow.slot} at {shadow.percent} %" if shadow else "")

    async def _set_trial(self, kind: str, trial: CanarySpec | ShadowSpec | None,
                         apply: Callable[[RoutingTable], RoutingTable],
                         described: str) -> dict[str, Any]:
        """Route by the table ``apply`` makes of the current one, where a ``kind`` (canary or
        shadow) is set to ``trial`` or cleared; 409 ``<kind>_refused`` when it refuses."""
        async with self._switch_lock:
            try:
                table = apply(self.router.table)
            except ValueError as exc:
                raise ClientError(409, f"{kind}_refused", str(exc)) from None
            self._change(table)
        logger.info("%s %s", kind, described or "cleared")
        return {kind: trial.to_json() if trial else None, "active": table.active,
                "generation": self.generation}

    def _change(self, table: RoutingTable,
                checked: dict[str, str | None] | None = None) -> RoutingTable:
        """Persist ``table`` and route by it (the caller holds the switch lock)."""
        if len(table.slots) > MAX_SLOTS:
            raise ClientError(409, "too_many_slots",
                              f"the proxy holds at most {MAX_SLOTS} slots: remove one first")
        persist_table(self.state_dir, table)
        self.router.install(table, checked)
        self.generation += 1
        return table


def _target(scope: Scope) -> str:
    """The request target to send upstream: the raw path and the query string."""
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return target


def _freeze_startup_objects() -> None:
    """Keep what is loaded at startup out of later garbage collections: a full collection walks
    every tracked object, and a request in flight waits for it (see the model service's
    ``freeze_startup_objects``)."""
    import gc

    gc.collect()
    gc.freeze()
