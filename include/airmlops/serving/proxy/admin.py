"""The admin side of the proxy (``/__proxy/``): who may change the routing, what a change
request must hold, and the state and metrics it reports. The endpoints themselves are served
by :class:`~airmlops.serving.proxy.app.ReverseProxy`."""

from __future__ import annotations

import dataclasses
import hmac
import json
from collections.abc import Mapping
from typing import Any

from airmlops.serving.proxy.asgi import ClientError, Scope
from airmlops.serving.proxy.routing import Router
from airmlops.serving.proxy.stats import LATENCY_BUCKETS_MS, SlotStats
from airmlops.serving.proxy.table import CanarySpec, RoutingTable, ShadowSpec, SlotSpec
from airmlops.serving.proxy.validation import (
    validate_entity_key,
    validate_percent,
    validate_slot,
    validate_upstream,
    validate_upstreams,
    validate_version,
    validate_weight,
)

ADMIN_PREFIX = "/__proxy/"
ADMIN_BODY_LIMIT = 4096
ENDPOINTS = frozenset(
    f"{ADMIN_PREFIX}{name}" for name in ("livez", "healthz", "state", "metrics", "switch",
                                        "register", "canary", "shadow"))
_SWITCH_KEYS = frozenset({"slot", "version", "upstreams", "upstream", "verify", "spares"})
_REGISTER_KEYS = frozenset({"slot", "version", "upstreams", "spares"})
_CANARY_KEYS = frozenset({"slot", "weight", "entity_key"})
_SHADOW_KEYS = frozenset({"slot", "percent"})
_COUNTER_HELP = (
    ("upstream_errors", "Answers of 502 or 504: an upstream failed or timed out."),
    ("retries", "Requests sent a second time because the first attempt got no answer."),
    ("failovers", "Requests routed to another slot of the active slot's version."),
    ("unavailable", "Requests answered 503 because no upstream was healthy."),
    ("switches", "Switches of the active slot."),
    ("shadow_mirrored", "Copies of live requests sent to the shadow slot."),
    ("shadow_dropped", "Copies of live requests dropped: the shadow queue was full, or the "
     "shadow was cleared or had no healthy upstream before they were sent."),
    ("shadow_shed", "Copies of live requests shed while live answers were slower than lately."),
    ("shadow_errors", "Copies the shadow slot failed: no connection, timeout or non-2xx."),
)


@dataclasses.dataclass(frozen=True)
class SwitchRequest:
    """A valid ``POST /__proxy/switch``: make ``slot`` serve ``spec`` and route to it, after
    checking its upstreams' readiness if ``verify``."""

    slot: str
    spec: SlotSpec
    verify: bool


@dataclasses.dataclass(frozen=True)
class RegisterRequest:
    """A valid ``POST /__proxy/register``: record ``slot`` (``spec``), or remove it when
    ``spec`` is None (no upstreams)."""

    slot: str
    version: str | None
    spec: SlotSpec | None


def is_admin_path(path: str) -> bool:
    """True if ``path`` is under the admin prefix (never forwarded)."""
    return path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/")


def authenticate(scope: Scope, token: str) -> None:
    """Pass if the request carries ``Authorization: Bearer <token>``; else ClientError 401."""
    supplied = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                supplied = credential.strip()
    if not supplied or not hmac.compare_digest(supplied.encode(), token.encode()):
        raise ClientError(401, "unauthorized", "a valid admin bearer token is required")


def parse_switch(body: bytes) -> SwitchRequest:
    """The switch ``body`` asks for (``upstreams``, or the older single ``upstream``); else
    ClientError 400."""
    try:
        request = _admin_request(body, _SWITCH_KEYS)
        slot = validate_slot(request.get("slot"))
        if "upstream" in request and "upstreams" in request:
            raise ValueError("give 'upstream' or 'upstreams', not both")
        if "upstreams" in request:
            urls = validate_upstreams(request["upstreams"])
        else:
            urls = (validate_upstream(request.get("upstream")),)
        spec = SlotSpec(validate_version(request.get("version")), urls, request.get("spares", 0))
        verify = request.get("verify", True)
        if not isinstance(verify, bool):
            raise ValueError("'verify' must be a boolean")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, "bad_request", f"invalid switch request: {exc}") from None
    return SwitchRequest(slot, spec, verify)


def parse_register(body: bytes) -> RegisterRequest:
    """The register ``body`` asks for; else ClientError 400."""
    try:
        request = _admin_request(body, _REGISTER_KEYS)
        slot = validate_slot(request.get("slot"))
        urls = validate_upstreams(request.get("upstreams"), allow_empty=True)
        version = validate_version(request.get("version"))
        spec = SlotSpec(version, urls, request.get("spares", 0)) if urls else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, "bad_request", f"invalid register request: {exc}") from None
    return RegisterRequest(slot, version, spec)


def parse_canary(body: bytes) -> CanarySpec | None:
    """The canary ``body`` asks for: ``{"slot", "weight", "entity_key"}`` sets one,
    ``{"slot": null}`` clears it; else ClientError 400 naming the field."""
    try:
        request = _admin_request(body, _CANARY_KEYS)
        if request.get("slot") is None:
            if set(request) - {"slot"}:
                raise ValueError("clearing the canary ('slot': null) takes no other field")
            return None
        return CanarySpec(validate_slot(request["slot"]), validate_weight(request.get("weight")),
                          validate_entity_key(request.get("entity_key")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, "bad_request", f"invalid canary request: {exc}") from None


def parse_shadow(body: bytes) -> ShadowSpec | None:
    """The shadow ``body`` asks for: ``{"slot", "percent"}`` sets one (``percent`` 100 when
    omitted), ``{"slot": null}`` clears it; else ClientError 400 naming the field."""
    try:
        request = _admin_request(body, _SHADOW_KEYS)
        if request.get("slot") is None:
            if set(request) - {"slot"}:
                raise ValueError("clearing the shadow ('slot': null) takes no other field")
            return None
        return ShadowSpec(validate_slot(request["slot"]),
                          validate_percent(request.get("percent", 100)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, "bad_request", f"invalid shadow request: {exc}") from None


def _admin_request(body: bytes, allowed: frozenset[str]) -> dict[str, Any]:
    """``body`` as a JSON object of no field outside ``allowed``; else ValueError."""
    request = json.loads(body or b"null")
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    return request


def switch_answer(request: SwitchRequest, previous: RoutingTable, table: RoutingTable,
                  checked: Mapping[str, str | None], generation: int) -> dict[str, Any]:
    """What a switch from ``previous`` to ``table`` answers (``checked``: url -> the error of
    its readiness check)."""
    urls = request.spec.upstreams
    old = previous.active_spec
    return {
        "upstream": urls[0],
        "upstreams": list(urls),
        "slot": request.slot,
        "version": request.spec.version,
        "not_ready": {url: error for url, error in checked.items() if error is not None},
        "previous": None if old is None else {
            "slot": previous.active, "url": old.upstreams[0], "version": old.version,
            "upstreams": list(old.upstreams)},
        "generation": generation,
        "active": table.active,
    }


def render_state(router: Router, counters: Mapping[str, int], generation: int,
                 boot: str, shadow_budget: float | None = None) -> dict[str, Any]:
    """What ``GET /__proxy/state`` answers: the table with health, counters and stats, and
    the shadow mirror's copy budget (copies per second; None while unlimited)."""
    table = router.table
    spec = table.active_spec
    return {
        "upstream": spec.upstreams[0] if spec else None,
        "slot": table.active,
        "active": table.active,
        "version": spec.version if spec else None,
        "routing": router.route.mode,
        "generation": generation,
        "canary": table.canary.to_json() if table.canary else None,
        "canary_routing": router.canary is not None,
        "shadow": table.shadow.to_json() if table.shadow else None,
        "shadow_routing": router.shadow is not None,
        "shadow_budget_per_s": None if shadow_budget is None else round(shadow_budget, 1),
        **counters,
        "slots": {
            name: {"version": slot.version, "active": name == table.active,
                   "spares": slot.spares,
                   "upstreams": [backend.describe() for backend in router.backends[name]]}
            for name, slot in table.slots.items()
        },
        "stats": {name: router.stats_for(name).snapshot(boot)
                  for name in sorted({*router.stats, *table.slots})},
    }


def render_metrics(router: Router, counters: Mapping[str, int]) -> str:
    """What ``GET /__proxy/metrics`` answers (Prometheus text format 0.0.4)."""
    charged = [("", router.unrouted), *sorted(router.stats.items())]
    lines: list[str] = []
    _family(lines, "airmlops_proxy_requests_total", "counter",
            "Answers given, by the slot charged with them and status class.")
    for slot, stats in charged:
        for index, count in enumerate(stats.classes):
            if count or 2 <= index <= 5:
                lines.append(f'airmlops_proxy_requests_total{{slot="{_label(slot)}",'
                             f'code_class="{index}xx"}} {count}')
    for key, text in _COUNTER_HELP:
        _family(lines, f"airmlops_proxy_{key}_total", "counter", text)
        lines.append(f"airmlops_proxy_{key}_total {counters[key]}")
    _family(lines, "airmlops_proxy_upstream_healthy", "gauge",
            "1 if the upstream passes its health checks, else 0.")
    for slot, backends in router.backends.items():
        for backend in backends:
            lines.append(f'airmlops_proxy_upstream_healthy{{slot="{_label(slot)}",'
                         f'upstream="{_label(backend.url)}"}} {int(backend.healthy)}')
    _family(lines, "airmlops_proxy_request_duration_seconds", "histogram",
            "Time from a request's arrival to its answer, by the slot charged with it.")
    for slot, stats in charged:
        lines.extend(_histogram_lines(_label(slot), stats))
    return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, text: str) -> None:
    """Append the HELP and TYPE lines of metric family ``name``."""
    lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))


def _histogram_lines(label: str, stats: SlotStats) -> list[str]:
    """The latency histogram of one slot (already escaped ``label``)."""
    lines: list[str] = []
    cumulative = 0
    for bound, count in zip((*(str(ms / 1000) for ms in LATENCY_BUCKETS_MS), "+Inf"),
                            stats.counts, strict=True):
        cumulative += count
        lines.append(f'airmlops_proxy_request_duration_seconds_bucket{{slot="{label}",'
                     f'le="{bound}"}} {cumulative}')
    lines.append(f'airmlops_proxy_request_duration_seconds_sum{{slot="{label}"}} '
                 f"{stats.sum_ms / 1000:.6f}")
    lines.append(f'airmlops_proxy_request_duration_seconds_count{{slot="{label}"}} '
                 f"{stats.requests}")
    return lines


def _label(value: str) -> str:
    """``value`` escaped for a Prometheus label."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
