"""The canary split: which /predict requests a canary slot takes, sticky by entity.

A request belongs to bucket ``blake2b(entity id, 8 bytes) mod 10000`` (its entity id as text:
``17`` and ``"17"`` are the same customer); the canary takes the buckets below ``weight * 100``,
so one entity always sees one version at a given weight, and raising the weight only moves
more entities to the canary (never one back). The entity is the ``entity_key`` field of the
body's first instance (``{"instances": [{...}, ...]}``) or of the body itself (a flat object).
A body that is not such JSON, or has no usable entity, goes to the stable slot, which answers
it as it would without a canary.

The body is parsed only while a canary is set and only for ``POST /predict``; without a canary
the proxy's path is the one it always was.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airmlops.serving.proxy.routing import Route

BUCKETS = 10_000
"""Entities are split into this many buckets: a weight of 1 % is 100 of them."""
CANARY_PATH = "/predict"
MAX_ENTITY_LENGTH = 256


def bucket(entity: str) -> int:
    """The bucket (0..9999) of ``entity``: stable across processes and versions."""
    digest = hashlib.blake2b(entity.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def entity_of(body: bytes, key: str) -> str | None:
    """The entity id of a /predict ``body`` (the ``key`` field of its first instance, or of
    the body itself), as text; None when there is none to read."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    instances = data.get("instances")
    if isinstance(instances, list):
        row: Any = instances[0] if instances else None
    else:
        row = data
    value = row.get(key) if isinstance(row, dict) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | str):
        text = str(value)
        return text if 0 < len(text) <= MAX_ENTITY_LENGTH else None
    return None


class CanaryRoute:
    """The canary in force: its route (healthy serving upstreams of the canary slot), the
    entity field and the bucket threshold. Replaced, never mutated, like :class:`Route`."""

    __slots__ = ("entity_key", "route", "slot", "threshold", "weight")

    def __init__(self, slot: str, weight: int, entity_key: str, route: Route) -> None:
        """The canary ``slot`` taking ``weight`` percent of the entities through ``route``."""
        self.slot = slot
        self.weight = weight
        self.entity_key = entity_key
        self.threshold = weight * (BUCKETS // 100)
        self.route = route

    def takes(self, body: bytes) -> bool:
        """True if the request of ``body`` goes to the canary."""
        if self.threshold <= 0:
            return False
        entity = entity_of(body, self.entity_key)
        return entity is not None and bucket(entity) < self.threshold
