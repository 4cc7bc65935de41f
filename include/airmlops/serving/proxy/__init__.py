"""The stable address of a deployed model: a small reverse proxy that knows its upstreams.

Clients call one address that never changes between model versions; blue/green deploys start
the new version beside the old one and then tell this proxy to send new requests there.
It needs nothing but the Python environment, so the embedded default works without nginx or
Traefik: uvicorn (httptools, uvloop) serves it and a lean keep-alive client
(:mod:`airmlops.serving.upstream`, httptools again) talks to the upstreams. That client rather
than aiohttp's, which spent ~65 % of the proxy's CPU per request (benchmarks/README.md), or
httpx's AsyncClient, slower still.

Routing. The proxy holds a table of slots, ``{slot: {"version": v, "upstreams": [url, ...],
"spares": n}}``, one of them active; a slot's upstreams are servers of one model version, the
last ``spares`` of them hot spares (started and checked, but idle while another serves: on a
small machine a second server sharing the traffic costs more in CPU contention than it brings).

* Each request goes to the next healthy serving upstream of the active slot (round robin),
  chosen from the routing read when the request arrives: a switch changes where NEW requests
  go, while requests in flight finish where they started, so a switch fails no request.
* If the active slot has no healthy serving upstream, requests go to its healthy spares, then
  to the healthy upstreams of another slot serving the same (non-null) version: a *failover*,
  counted per request and logged once per episode. If there is none, the answer is a JSON 503
  ``no_healthy_upstream`` with ``Retry-After: 1`` (``no_upstream`` when nothing is deployed).
* The answer carries ``X-Upstream-Slot`` (the slot that served it). An upstream that cannot be
  reached gives a JSON 502 (504 when it does not answer within ``--read-timeout``).

Health. Every ``--health-interval`` seconds (0.5 by default) each upstream of each slot is asked
``GET /readyz`` on a fresh connection (1 s timeout); 200 is healthy. A new upstream starts
healthy (a verified switch has just seen it ready); two failed checks in a row mark it down (one
may be a check racing a restart), the next good check marks it up again. Passively, a request
that cannot connect to an upstream marks it down at once.

Retry. An attempt that failed before any byte of an answer came back (no connection, or the
connection closed first: the worker died with the request, or an idle keep-alive connection was
closed under it) is retried once on a different healthy upstream, if there is one. An idle
connection closed under the request may also be retried once on a fresh connection to the same
upstream when no other is healthy (the classic keep-alive race; if that upstream turns out to be
gone, the connect error may still move the request to another). This holds for every method,
POST included: a prediction may be computed twice, but only when its first attempt never
answered. Timeouts (504) and invalid or cut-off answers (502) are not retried.

Admin. ``/__proxy/`` is the admin prefix, never forwarded:

* ``GET /__proxy/livez``: 200 while the process runs;
* ``GET /__proxy/healthz``: 200 ``{"status": "ok"}`` when a request would be routed, else 503
  ``{"status": "unavailable"|"empty", "message": ...}``;
* ``GET /__proxy/state``: the routing table with each upstream's health, the counters and the
  per-slot statistics (``stats``: requests, errors, latency histogram) that
  :func:`slot_stats` reads and :func:`bake_window` compares; the canary and shadow entries
  too;
* ``GET /__proxy/metrics``: the same in the Prometheus text format (``airmlops_proxy_*``);
* ``POST /__proxy/switch`` ``{"slot", "version", "upstreams", "verify"}`` sets a slot and makes
  it active (the older ``{"upstream", "slot", "verify"}`` still works), after checking the
  upstreams' ``/readyz`` unless ``"verify": false`` (409 when none is ready);
* ``POST /__proxy/register`` ``{"slot", "version", "upstreams"}`` records a slot that is not
  active (a rollback target, a failover candidate); ``"upstreams": []`` removes it.
* ``POST /__proxy/canary`` ``{"slot", "weight", "entity_key"}`` makes a registered inactive
  slot the canary: it takes the ``POST /predict`` requests whose entity id hashes below
  ``weight`` percent, sticky per entity (:mod:`.canary`); ``{"slot": null}`` clears it, and a
  switch to the canary's slot ends it. Without a canary no body is read before forwarding.
* ``POST /__proxy/shadow`` ``{"slot", "percent"}`` makes a registered slot that is neither
  active nor the canary the shadow (``percent`` 1..100, 100 by default); ``{"slot": null}``
  clears it, and switching to the shadow's slot or removing it ends it.

Shadow (:mod:`.shadow`). While a shadow is set and one of its serving upstreams is healthy,
``POST /predict`` bodies are read before forwarding (as for a canary) and forwarded to the live
route as usual. Only after the live answer has been sent, and only if it is a 200 carrying a valid
``X-Request-ID`` (32 lowercase hex digits), the request may be mirrored: it is when the first 8
hex digits of its id, mod 100, are below ``percent`` (deterministic per request). The copy is put
on a bounded queue (256 by default) without waiting: a full queue drops it first
(``shadow_dropped``), so live answers never wait for the shadow. A couple of workers (2 by
default) send the queued copies to a healthy upstream of the shadow slot, with the client's
proxied headers plus ``X-Airmlops-Shadow-Of: <live request id>``, within ``--read-timeout``
and never retried. The shadow's answers go to no client: their status and latency count in the
shadow slot's ``stats`` and in ``shadow_mirrored`` / ``shadow_errors`` (no connection, timeout,
non-2xx). A client's own ``X-Airmlops-Shadow-Of`` is stripped from every forwarded request, so
only the proxy marks a request as a shadow copy. While live answers are slower than lately
(:class:`.shadow.LivePressure`: a 0.25 s window's mean latency more than 25 % and 1 ms above the
fastest window of the last 10 s), new and queued copies are shed, counted in ``shadow_shed``.
Without a shadow nothing of this runs.

The POSTs need ``Authorization: Bearer <token>``; the token is random, kept with mode 0600
in the state directory (:func:`ensure_admin_token`). The table is persisted there, so a
restarted proxy resumes it (health is not: every upstream starts healthy again).

Clients are held to :class:`~airmlops.serving.http_limits.HttpLimits` before anything is
forwarded: oversized headers 431, oversized bodies 413, slow headers or bodies 408, a request on
a connection beyond ``--max-connections`` 503, idle connections closed after ``--keep-alive``.

Upstreams must be loopback addresses, and the proxy itself binds 127.0.0.1 only.
Run it as ``python -m airmlops.serving.proxy --port N --state-dir D``.

Modules: :mod:`.validation` (what is accepted, the admin token), :mod:`.table` (the routing
table and its persistence), :mod:`.stats` (per-slot statistics, :func:`bake_window`),
:mod:`.routing` (health and the route), :mod:`.canary` (the sticky split), :mod:`.shadow` (the
mirror), :mod:`.headers`,
:mod:`.asgi`, :mod:`.admin`,
:mod:`.app` (:class:`~airmlops.serving.proxy.app.ReverseProxy`), :mod:`.client` (what a deploy
calls) and :mod:`.cli` (the process). Importing this package loads neither the ASGI
application nor any HTTP library: the client imports httpx when first called.
"""

from __future__ import annotations

from airmlops.serving.proxy.client import (
    ProxyAdminError,
    clear_canary,
    clear_shadow,
    get_state,
    healthz,
    livez,
    proxy_url,
    register,
    set_canary,
    set_shadow,
    slot_stats,
    switch,
)
from airmlops.serving.proxy.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_READ_TIMEOUT,
)
from airmlops.serving.proxy.stats import (
    LATENCY_BUCKETS_MS,
    SlotStats,
    bake_window,
    step_window,
)
from airmlops.serving.proxy.table import (
    MAX_SLOTS,
    STATE_FILE,
    CanarySpec,
    RoutingTable,
    ShadowSpec,
    SlotSpec,
    load_persisted_table,
    persist_table,
)
from airmlops.serving.proxy.validation import (
    HOST,
    MAX_UPSTREAMS,
    TOKEN_FILE,
    ensure_admin_token,
    validate_entity_key,
    validate_port,
    validate_slot,
    validate_upstream,
    validate_upstreams,
    validate_version,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_HEALTH_INTERVAL", "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_READ_TIMEOUT", "HOST", "LATENCY_BUCKETS_MS", "MAX_SLOTS", "MAX_UPSTREAMS",
    "STATE_FILE", "TOKEN_FILE", "CanarySpec", "ProxyAdminError", "RoutingTable", "ShadowSpec",
    "SlotSpec", "SlotStats", "bake_window", "clear_canary", "clear_shadow", "ensure_admin_token",
    "get_state", "healthz", "livez", "load_persisted_table", "persist_table", "proxy_url",
    "register", "set_canary", "set_shadow", "slot_stats", "step_window", "switch",
    "validate_entity_key", "validate_port", "validate_slot", "validate_upstream",
    "validate_upstreams", "validate_version",
]
