"""The routing table: the slots the proxy knows, which one is active, and its persistence.

What is configured, not what is healthy: health lives with the running proxy (:mod:`.routing`)
and is not persisted, so a restarted proxy resumes the table with every upstream healthy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airmlops.serving.proxy.validation import (
    validate_entity_key,
    validate_percent,
    validate_slot,
    validate_upstream,
    validate_upstreams,
    validate_version,
    validate_weight,
)

logger = logging.getLogger("airmlops.serving.proxy")

STATE_FILE = "proxy-state.json"
MAX_SLOTS = 8


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """One slot as configured: the model version it serves (None: unknown) and its upstreams,
    the last ``spares`` of them hot spares (checked, sent requests only when no other upstream
    of the slot is healthy, or as a retry)."""

    version: str | None
    upstreams: tuple[str, ...]
    spares: int = 0

    def __post_init__(self) -> None:
        """Refuse a ``spares`` that would leave no upstream serving."""
        if (isinstance(self.spares, bool) or not isinstance(self.spares, int)
                or not 0 <= self.spares < max(1, len(self.upstreams))):
            raise ValueError(f"'spares' must be an int from 0 to the number of upstreams - 1, "
                             f"got {self.spares!r}")

    @property
    def serving(self) -> int:
        """How many upstreams share the traffic (the first ones)."""
        return len(self.upstreams) - self.spares

    def to_json(self) -> dict[str, Any]:
        """This slot as the persisted JSON object."""
        return {"version": self.version, "upstreams": list(self.upstreams),
                "spares": self.spares}


@dataclasses.dataclass(frozen=True)
class CanarySpec:
    """A canary beside the active slot: ``slot`` takes the /predict requests whose entity (the
    ``entity_key`` field of the body, of its first instance) hashes below ``weight`` percent."""

    slot: str
    weight: int
    entity_key: str

    def __post_init__(self) -> None:
        """Refuse a malformed slot, weight or entity key (ValueError naming the field)."""
        validate_slot(self.slot)
        validate_weight(self.weight)
        validate_entity_key(self.entity_key)

    def to_json(self) -> dict[str, Any]:
        """This canary as the persisted JSON object."""
        return {"slot": self.slot, "weight": self.weight, "entity_key": self.entity_key}

    @classmethod
    def from_json(cls, data: Any) -> CanarySpec:
        """The canary :meth:`to_json` wrote; ValueError if it is not one."""
        if not isinstance(data, dict) or set(data) != {"slot", "weight", "entity_key"}:
            raise ValueError("'canary' must be an object of 'slot', 'weight' and 'entity_key'")
        return cls(data["slot"], data["weight"], data["entity_key"])


@dataclasses.dataclass(frozen=True)
class ShadowSpec:
    """A shadow beside the active slot: ``slot`` is sent a copy of ``percent`` percent of the
    live /predict requests (after their live answer, which it never changes)."""

    slot: str
    percent: int = 100

    def __post_init__(self) -> None:
        """Refuse a malformed slot or percent (ValueError naming the field)."""
        validate_slot(self.slot)
        validate_percent(self.percent)

    def to_json(self) -> dict[str, Any]:
        """This shadow as the persisted JSON object."""
        return {"slot": self.slot, "percent": self.percent}

    @classmethod
    def from_json(cls, data: Any) -> ShadowSpec:
        """The shadow :meth:`to_json` wrote; ValueError if it is not one."""
        if not isinstance(data, dict) or set(data) != {"slot", "percent"}:
            raise ValueError("'shadow' must be an object of 'slot' and 'percent'")
        return cls(data["slot"], data["percent"])


@dataclasses.dataclass(frozen=True)
class RoutingTable:
    """The slots the proxy knows and which one is active. Never mutated: a change builds a new
    table, so a request that read the routing on arrival keeps a consistent view."""

    slots: Mapping[str, SlotSpec] = dataclasses.field(default_factory=dict)
    active: str | None = None
    canary: CanarySpec | None = None
    shadow: ShadowSpec | None = None

    def __post_init__(self) -> None:
        """Refuse an active slot the table does not hold, a canary that is not another slot
        of the table beside an active one, and a shadow that is not a third."""
        if self.active is not None and self.active not in self.slots:
            raise ValueError(f"the active slot {self.active!r} is not in the table")
        if self.canary is not None:
            if self.active is None:
                raise ValueError("a canary needs an active slot to share the traffic with")
            if self.canary.slot == self.active or self.canary.slot not in self.slots:
                raise ValueError(f"the canary slot {self.canary.slot!r} must be a registered "
                                 "slot other than the active one")
        if self.shadow is not None:
            _check_shadow(self, self.shadow.slot)

    @property
    def active_spec(self) -> SlotSpec | None:
        """The active slot's spec, None when nothing is active."""
        return self.slots[self.active] if self.active is not None else None

    def with_slot(self, name: str, spec: SlotSpec, *, activate: bool) -> RoutingTable:
        """This table with slot ``name`` set to ``spec`` (and made active if ``activate``).
        Activating the canary's slot ends the canary: it now takes all the traffic; activating
        the shadow's slot ends the shadow (it is live now)."""
        canary, shadow = self.canary, self.shadow
        if activate and canary is not None and canary.slot == name:
            canary = None
        if activate and shadow is not None and shadow.slot == name:
            shadow = None
        return RoutingTable({**self.slots, name: spec}, name if activate else self.active,
                            canary, shadow)

    def without_slot(self, name: str) -> RoutingTable:
        """This table without slot ``name`` (which must not be the active one); removing the
        canary's or the shadow's slot ends the canary or the shadow."""
        if name == self.active:
            raise ValueError(f"slot {name!r} is active")
        canary = None if self.canary is not None and self.canary.slot == name else self.canary
        shadow = None if self.shadow is not None and self.shadow.slot == name else self.shadow
        return RoutingTable({k: v for k, v in self.slots.items() if k != name}, self.active,
                            canary, shadow)

    def with_canary(self, canary: CanarySpec | None) -> RoutingTable:
        """This table with ``canary`` set (None: no canary); ValueError if it does not fit."""
        return RoutingTable(self.slots, self.active, canary, self.shadow)

    def with_shadow(self, shadow: ShadowSpec | None) -> RoutingTable:
        """This table with ``shadow`` set (None: no shadow); ValueError if its slot is not
        registered, is the active slot or is the canary's."""
        return RoutingTable(self.slots, self.active, self.canary, shadow)

    def to_json(self) -> dict[str, Any]:
        """This table as the persisted JSON object (``canary`` and ``shadow`` only when
        set)."""
        data: dict[str, Any] = {
            "active": self.active,
            "slots": {name: spec.to_json() for name, spec in self.slots.items()}}
        if self.canary is not None:
            data["canary"] = self.canary.to_json()
        if self.shadow is not None:
            data["shadow"] = self.shadow.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> RoutingTable:
        """The table :meth:`to_json` wrote, or the older ``{"url", "slot"}`` of one upstream;
        ValueError if it is neither."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        if "slots" not in data:  # the format before slots: one active upstream
            slot = validate_slot(data.get("slot"))
            return cls({slot: SlotSpec(None, (validate_upstream(data.get("url")),))}, slot)
        slots = data["slots"]
        if not isinstance(slots, dict) or len(slots) > MAX_SLOTS:
            raise ValueError(f"'slots' must be an object of at most {MAX_SLOTS} slots")
        table: dict[str, SlotSpec] = {}
        for name, spec in slots.items():
            if not isinstance(spec, dict):
                raise ValueError(f"slot {name!r} must be an object")
            table[validate_slot(name)] = SlotSpec(validate_version(spec.get("version")),
                                                  validate_upstreams(spec.get("upstreams")),
                                                  spec.get("spares", 0))
        active = data.get("active")
        canary = data.get("canary")
        shadow = data.get("shadow")
        return cls(table, validate_slot(active) if active is not None else None,
                   CanarySpec.from_json(canary) if canary is not None else None,
                   ShadowSpec.from_json(shadow) if shadow is not None else None)


def _check_shadow(table: RoutingTable, slot: str) -> None:
    """Refuse a shadow ``slot`` that ``table`` does not hold, or that already serves live
    traffic (the active slot, the canary's); ValueError saying which."""
    if table.active is None:
        raise ValueError("a shadow needs an active slot whose traffic it mirrors")
    if slot not in table.slots:
        raise ValueError(f"the shadow slot {slot!r} is not registered: register it first")
    if slot == table.active:
        raise ValueError(f"the shadow slot {slot!r} is the active slot: it already serves the "
                         "live traffic")
    if table.canary is not None and slot == table.canary.slot:
        raise ValueError(f"the shadow slot {slot!r} is the canary slot: it already serves "
                         "live traffic")


def persist_table(state_dir: Path, table: RoutingTable) -> None:
    """Record ``table`` in ``state_dir`` (atomic write)."""
    from airmlops.paths import atomic_write_json

    atomic_write_json(Path(state_dir) / STATE_FILE, table.to_json())


def load_persisted_table(state_dir: Path) -> RoutingTable:
    """The table last persisted in ``state_dir``; an empty one if there is none or it is
    invalid (logged)."""
    path = Path(state_dir) / STATE_FILE
    try:
        return RoutingTable.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return RoutingTable()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring the persisted routing table %s: %s", path, exc)
        return RoutingTable()
