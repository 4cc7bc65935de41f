"""The client side of the proxy: what a deploy calls to read and change a running proxy.

Needs only httpx (imported on first call), never the proxy's server stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airmlops.serving.proxy.validation import (
    HOST,
    validate_entity_key,
    validate_percent,
    validate_port,
    validate_slot,
    validate_upstreams,
    validate_version,
    validate_weight,
)


class ProxyAdminError(RuntimeError):
    """The proxy refused or failed an admin call; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        """Record ``message`` and the HTTP ``status`` (0: no answer)."""
        super().__init__(message)
        self.status = status


def proxy_url(port: int) -> str:
    """The stable address of the proxy on ``port``."""
    return f"http://{HOST}:{validate_port(port)}"


def livez(port: int, timeout: float = 2.0) -> bool:
    """True when a proxy process answers on ``port`` at all (whatever it routes to); never
    raises."""
    return _answers_200(f"{proxy_url(port)}/__proxy/livez", timeout)


def healthz(port: int, timeout: float = 2.0) -> bool:
    """True only when the proxy on ``port`` can serve: a request would be routed to a healthy
    upstream (of the active slot, or of a failover slot of its version). Never raises."""
    return _answers_200(f"{proxy_url(port)}/__proxy/healthz", timeout)


def _answers_200(url: str, timeout: float) -> bool:
    """True if ``GET url`` answers 200 within ``timeout``; never raises."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


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


def slot_stats(port: int, slot: str, timeout: float = 5.0) -> dict[str, Any]:
    """The cumulative statistics of ``slot`` on the proxy on ``port`` (see
    :func:`~airmlops.serving.proxy.stats.bake_window`): ``{"proxy_boot", "requests", "errors",
    "latency_buckets_ms", "latency_counts", "latency_sum_ms"}``. Raises
    :class:`ProxyAdminError` (404) if the proxy knows no such slot.
    """
    stats = get_state(port, timeout)["stats"]
    if validate_slot(slot) not in stats:
        raise ProxyAdminError(f"the proxy on port {port} knows no slot {slot!r}", 404)
    return stats[slot]


def switch(
    port: int,
    token: str,
    upstream: str | Sequence[str],
    slot: str,
    *,
    version: str | None = None,
    verify: bool = True,
    spares: int = 0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Make ``slot`` (serving ``version`` from ``upstream``, one URL or several replicas, the
    last ``spares`` of them hot spares) the active slot of the proxy on ``port``; return its
    answer.

    With ``verify`` the proxy first checks each upstream's ``/readyz`` and refuses (409) if
    none is ready; those not ready start as unhealthy. Raises :class:`ProxyAdminError` on any
    refusal or failure, ValueError on an invalid argument.
    """
    urls = [upstream] if isinstance(upstream, str) else list(upstream)
    payload = {
        "slot": validate_slot(slot),
        "version": validate_version(version),
        "upstreams": list(validate_upstreams(urls)),
        "verify": verify,
        "spares": spares,
    }
    return _admin_post(port, token, "switch", payload, timeout)


def register(
    port: int,
    token: str,
    slot: str,
    upstreams: Sequence[str],
    version: str | None,
    *,
    spares: int = 0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Record ``slot`` (serving ``version`` from ``upstreams``, the last ``spares`` of them hot
    spares) on the proxy on ``port`` without routing to it: a rollback target, and a failover
    candidate if it serves the active version. Empty ``upstreams`` removes the slot. The active
    slot is refused (409)."""
    payload = {
        "slot": validate_slot(slot),
        "version": validate_version(version),
        "upstreams": list(validate_upstreams(
            upstreams if isinstance(upstreams, str) else list(upstreams), allow_empty=True)),
        "spares": spares,
    }
    return _admin_post(port, token, "register", payload, timeout)


def set_canary(port: int, token: str, slot: str, weight: int, entity_key: str, *,
               timeout: float = 10.0) -> dict[str, Any]:
    """Make the registered, inactive ``slot`` the canary of the proxy on ``port``: it takes
    the /predict requests whose entity (field ``entity_key``) hashes below ``weight`` percent
    (:mod:`airmlops.serving.proxy.canary`). Raises :class:`ProxyAdminError` on a refusal (409
    when ``slot`` is not registered or is the active one), ValueError on an invalid argument."""
    payload = {"slot": validate_slot(slot), "weight": validate_weight(weight),
               "entity_key": validate_entity_key(entity_key)}
    return _admin_post(port, token, "canary", payload, timeout)


def clear_canary(port: int, token: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """End the canary of the proxy on ``port``: every request goes to the active slot again
    (a no-op without a canary)."""
    return _admin_post(port, token, "canary", {"slot": None}, timeout)


def set_shadow(port: int, token: str, slot: str, percent: int = 100, *,
               timeout: float = 10.0) -> dict[str, Any]:
    """Make the registered ``slot`` (neither the active one nor the canary's) the shadow of the
    proxy on ``port``: after each live /predict answer of 200, ``percent`` percent of the
    requests (chosen by request id) are sent to it too, and its answers are only counted
    (:mod:`airmlops.serving.proxy.shadow`). Raises :class:`ProxyAdminError` on a refusal (409
    for such a slot), ValueError on an invalid argument."""
    payload = {"slot": validate_slot(slot), "percent": validate_percent(percent)}
    return _admin_post(port, token, "shadow", payload, timeout)


def clear_shadow(port: int, token: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """End the shadow of the proxy on ``port``: nothing is mirrored any more (copies already
    queued are dropped); a no-op without a shadow."""
    return _admin_post(port, token, "shadow", {"slot": None}, timeout)


def _admin_post(port: int, token: str, action: str, payload: Mapping[str, Any],
                timeout: float) -> dict[str, Any]:
    """``POST /__proxy/<action>`` with ``payload`` and the admin ``token``; its JSON answer,
    or ProxyAdminError."""
    import httpx

    try:
        response = httpx.post(
            f"{proxy_url(port)}/__proxy/{action}",
            json=payload,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise ProxyAdminError(f"proxy on port {port} did not answer the {action}: {exc!r}"
                              ) from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise ProxyAdminError(
            f"proxy refused the {action} ({response.status_code}): {message}", response.status_code
        )
    return response.json()
