"""What the proxy knows at run time: each upstream's health, per-slot statistics, and the
route new requests take (see the package docstring for the rules).

:class:`Router` owns that state; the proxy asks it for the next upstream of a request, for an
alternative when an attempt fails, and tells it what health checks found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from airmlops.serving.proxy.canary import CanaryRoute
from airmlops.serving.proxy.shadow import ShadowRoute
from airmlops.serving.proxy.stats import SlotStats
from airmlops.serving.proxy.table import RoutingTable
from airmlops.serving.proxy.validation import HOST

logger = logging.getLogger("airmlops.serving.proxy")


class Backend:
    """One upstream of one slot as the proxy sees it: its address and its health."""

    __slots__ = ("consecutive_failures", "healthy", "host", "last_error", "port", "slot",
                 "slot_header", "stats", "url")

    def __init__(self, url: str, slot: str, stats: SlotStats) -> None:
        """A healthy upstream ``url`` of ``slot``, whose answers count in ``stats``."""
        self.url, self.slot, self.stats = url, slot, stats
        self.host, self.port = address(url)
        self.slot_header = slot.encode()
        self.healthy = True
        self.consecutive_failures = 0
        self.last_error: str | None = None

    def describe(self) -> dict[str, Any]:
        """This upstream as the proxy's state shows it."""
        return {"url": self.url, "healthy": self.healthy,
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error}


class Route:
    """Where new requests go now, recomputed whenever the table or an upstream's health
    changes and read once per request: the candidates (round robin), the fallbacks a retry may
    use when no other candidate is left (healthy spares and same-version slots), the stats
    charged when there is none, and whether the candidates are a failover."""

    __slots__ = ("candidates", "failover", "fallbacks", "message", "mode", "owner")

    def __init__(self, mode: str, candidates: tuple[Backend, ...], owner: SlotStats,
                 message: str = "", fallbacks: tuple[Backend, ...] = ()) -> None:
        """A route of ``mode``: "ok", "failover", "unavailable" or "empty"."""
        self.mode = mode
        self.candidates = candidates
        self.fallbacks = fallbacks
        self.failover = mode == "failover"
        self.owner = owner
        self.message = message


def address(url: str) -> tuple[str, int]:
    """The host and port of an upstream ``url``."""
    parts = urlsplit(url)
    return parts.hostname or HOST, parts.port or 80


class Router:
    """The table in force, its upstreams' health and the route they give. ``route`` is
    replaced (never mutated) on every change, so each request routes by what it read on
    arrival: a single reference read is atomic here."""

    def __init__(self, table: RoutingTable) -> None:
        """Route by ``table``, every upstream healthy."""
        self.stats: dict[str, SlotStats] = {}
        self.unrouted = SlotStats()  # answers no slot could be charged with
        self.backends: dict[str, tuple[Backend, ...]] = {}
        self.route = Route("empty", (), self.unrouted)
        self.canary: CanaryRoute | None = None  # None: no canary, or none of it is healthy
        self.shadow: ShadowRoute | None = None  # None: no shadow, or none of it is healthy
        self._turn = 0
        self.install(table)

    @property
    def table(self) -> RoutingTable:
        """The table in force."""
        return self._table

    def stats_for(self, slot: str) -> SlotStats:
        """The statistics of ``slot``, created on first use (they outlive the slot)."""
        stats = self.stats.get(slot)
        if stats is None:
            stats = self.stats[slot] = SlotStats()
        return stats

    def install(self, table: RoutingTable,
                checked: Mapping[str, str | None] | None = None) -> None:
        """Route by ``table`` from now on. Upstreams a slot keeps keep their health; new ones
        start healthy, except those of the active slot in ``checked`` (url -> the error of its
        readiness check, None if ready), which start as checked."""
        backends: dict[str, tuple[Backend, ...]] = {}
        for name, spec in table.slots.items():
            known = {backend.url: backend for backend in self.backends.get(name, ())}
            stats = self.stats_for(name)
            backends[name] = tuple(known.get(url) or Backend(url, name, stats)
                                   for url in spec.upstreams)
        if checked and table.active is not None:
            for backend in backends[table.active]:
                if backend.url in checked:
                    _set_checked(backend, checked[backend.url])
        self._table = table
        self.backends = backends
        self._reroute()

    def mark(self, backend: Backend, error: str | None, *, fall: int) -> None:
        """Record a check of ``backend``: None is a success; ``fall`` failures in a row mark it
        down. Only a change of health recomputes the route."""
        if error is None:
            backend.consecutive_failures = 0
            if backend.healthy:
                return
            backend.healthy = True
            logger.info("upstream %s of slot %s is up", backend.url, backend.slot)
        else:
            backend.consecutive_failures += 1
            backend.last_error = error
            if not backend.healthy or backend.consecutive_failures < fall:
                return
            backend.healthy = False
            logger.warning("upstream %s of slot %s is down: %s", backend.url, backend.slot, error)
        self._reroute()

    def pick(self, candidates: tuple[Backend, ...], avoid: Backend | None = None
             ) -> Backend | None:
        """The next of ``candidates`` (round robin) that is not ``avoid``."""
        count = len(candidates)
        turn = self._turn
        for _ in range(count):
            turn = turn + 1 if turn + 1 < count else 0
            if candidates[turn] is not avoid:
                self._turn = turn
                return candidates[turn]
        return None

    def alternative(self, backend: Backend) -> Backend | None:
        """Another upstream for a retry: the next healthy candidate, else a fallback (a spare,
        or a slot of the same version)."""
        route = self.route
        alternative = self.pick(route.candidates, backend)
        if alternative is None:
            alternative = next((b for b in route.fallbacks if b is not backend), None)
        return alternative

    def _reroute(self) -> None:
        """Recompute where new requests go from the table and the upstreams' health."""
        previous = self.route
        self.route = route = self._compute_route()
        self.canary = self._compute_canary()
        self.shadow = self._compute_shadow()
        if route.mode == previous.mode or route.owner is not previous.owner:
            return  # the same episode, or another active slot (a switch logs itself)
        spec = self._table.active_spec
        _log_episode(route, previous, self._table.active, spec.version if spec else None)

    def _compute_route(self) -> Route:
        """The route the table and the upstreams' health give now."""
        table = self._table
        active = table.active
        if active is None:
            return Route("empty", (), self.unrouted,
                         "no model version is deployed behind this address")
        owner = self.stats_for(active)
        spec = table.slots[active]
        own = self.backends[active]
        ready = tuple(backend for backend in own[:spec.serving] if backend.healthy)
        spare = tuple(backend for backend in own[spec.serving:] if backend.healthy)
        if spec.version is not None:
            spare += tuple(
                backend
                for name, other in table.slots.items()
                if name != active and other.version == spec.version
                for backend in self.backends[name]
                if backend.healthy
            )
        if ready:
            return Route("ok", ready, owner, fallbacks=spare)
        if spare:
            return Route("failover", spare, owner)
        return Route("unavailable", (), owner,
                     f"no upstream of slot {active} (version {spec.version}) is healthy "
                     "and no other slot serves that version; retry shortly")

    def _compute_canary(self) -> CanaryRoute | None:
        """The canary split the table and the upstreams' health give now: None without a
        canary, or when none of its serving upstreams is healthy (all traffic stays)."""
        canary = self._table.canary
        if canary is None:
            return None
        spec = self._table.slots[canary.slot]
        ready = tuple(b for b in self.backends[canary.slot][:spec.serving] if b.healthy)
        if not ready:
            return None
        route = Route("ok", ready, self.stats_for(canary.slot))
        return CanaryRoute(canary.slot, canary.weight, canary.entity_key, route)

    def _compute_shadow(self) -> ShadowRoute | None:
        """The shadow the table and the upstreams' health give now: None without a shadow, or
        when none of its serving upstreams is healthy (nothing is mirrored)."""
        shadow = self._table.shadow
        if shadow is None:
            return None
        spec = self._table.slots[shadow.slot]
        ready = tuple(b for b in self.backends[shadow.slot][:spec.serving] if b.healthy)
        if not ready:
            return None
        return ShadowRoute(shadow.slot, shadow.percent,
                           Route("ok", ready, self.stats_for(shadow.slot)))


def _set_checked(backend: Backend, error: str | None) -> None:
    """Set ``backend``'s health from a readiness check that found ``error`` (None: ready)."""
    backend.healthy = error is None
    backend.consecutive_failures = 0 if error is None else 1
    if error is not None:
        backend.last_error = error


def _log_episode(route: Route, previous: Route, active: str | None,
                 version: str | None) -> None:
    """Log the start or end of a failover or outage of the active slot."""
    if route.failover:
        slots = sorted({backend.slot for backend in route.candidates})
        logger.warning("slot %s has no healthy upstream: failing over to %s (version %s)",
                       active, ", ".join(slots), version)
    elif route.mode == "unavailable":
        logger.warning("answering 503: %s", route.message)
    elif route.mode == "ok" and previous.mode in ("failover", "unavailable"):
        logger.info("slot %s has a healthy upstream again", active)


async def readiness_error(host: str, port: int, timeout: float) -> str | None:
    """None if ``GET /readyz`` on a fresh connection answers 200 within ``timeout``, else what
    went wrong."""
    from airmlops.serving.upstream import UpstreamError, probe

    try:
        status = await probe(host, port, "/readyz", timeout=timeout)
    except TimeoutError:
        return f"/readyz did not answer within {timeout:g} s"
    except UpstreamError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if status == 200 else f"/readyz answered {status}"
