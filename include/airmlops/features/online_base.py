"""The interface every online store backend implements, and what the backends share.

:class:`OnlineStore` is the interface, :class:`OnlineResult` what a read returns;
:func:`rows_columns` turns written rows into columns of stored values (:func:`python_value`),
:func:`assemble` builds a read's result from the rows found, applying the ``as_of`` rule. The
semantics are described in :mod:`airmlops.features.online`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from airmlops.features.compute import DAY_US, NAT_US, datetime_to_epoch_us, to_epoch_us
from airmlops.features.definitions import FEATURE_TIMESTAMP, FeatureView
from airmlops.names import NAME_PATTERN, is_name

if TYPE_CHECKING:
    import pandas as pd


@dataclasses.dataclass
class OnlineResult:
    """What a read found.

    ``values[entity]`` has every requested feature of every requested view (``None`` where the
    view had no row for the entity); ``missing`` lists the requested entities found in no view
    (unknown, expired or too old for ``as_of``), in request order; ``event_ts[entity][view]`` is
    the event time (epoch microseconds) of the row served, or ``None``.
    """

    values: dict[Any, dict[str, Any]]
    missing: list[Any]
    event_ts: dict[Any, dict[str, int | None]]

    def __getitem__(self, entity_id: Any) -> dict[str, Any]:
        """The feature values of ``entity_id``."""
        return self.values[entity_id]

    def is_unknown(self, entity_id: Any) -> bool:
        """Whether ``entity_id`` was found in no view."""
        return entity_id in self._missing_set

    @property
    def _missing_set(self) -> set:
        return set(self.missing)


@runtime_checkable
class OnlineStore(Protocol):
    """The interface of every online store backend."""

    namespace: str
    round_trips: int

    @property
    def location(self) -> str:
        """Where the rows live, without secrets (keys the materialization watermarks)."""
        ...

    def write(
        self,
        view: FeatureView,
        rows: pd.DataFrame | Sequence[Mapping[str, Any]],
        *,
        ttl_seconds: int | None = None,
    ) -> int: ...

    def read(
        self,
        views: Sequence[FeatureView],
        entity_ids: Iterable[Any],
        *,
        as_of: dt.datetime | None = None,
    ) -> OnlineResult: ...

    def close(self) -> None: ...


# --- shared helpers ------------------------------------------------------------------------


def python_value(value: Any) -> Any:
    """The stored form of a feature value: bool, int, float, str or None (NaN -> None)."""
    if value is None or type(value) in (bool, str, int):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy float64 included (a float subclass)
        return None if math.isnan(value) else float(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return python_value(item())
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - pandas is always installed here
        pass
    return str(value)


def rows_columns(
    view: FeatureView, rows: pd.DataFrame | Sequence[Mapping[str, Any]]
) -> tuple[list[str], list[int], list[list[Any]]]:
    """(entity strings, event times in epoch us, per-feature value lists) of the input rows."""
    names = view.feature_names
    if hasattr(rows, "columns"):
        frame = rows
        missing = [c for c in (view.join_key, FEATURE_TIMESTAMP) if c not in frame.columns]
        if missing:
            raise ValueError(f"view '{view.name}': rows have no column(s) {missing}")
        if frame[view.join_key].isna().any():
            raise ValueError(f"view '{view.name}': rows with a missing key")
        entities = [str(e) for e in frame[view.join_key].tolist()]
        stamps = to_epoch_us(frame[FEATURE_TIMESTAMP]).tolist()
        columns = [
            _series_values(frame[n]) if n in frame.columns else [None] * len(frame)
            for n in names
        ]
        if any(s == NAT_US for s in stamps):
            raise ValueError(f"view '{view.name}': rows with a missing timestamp")
        return entities, stamps, columns
    else:
        entities, stamps, columns = [], [], [[] for _ in names]
        for row in rows:
            if view.join_key not in row or FEATURE_TIMESTAMP not in row:
                raise ValueError(
                    f"view '{view.name}': a row lacks '{view.join_key}' or '{FEATURE_TIMESTAMP}'"
                )
            if row[view.join_key] is None:
                raise ValueError(f"view '{view.name}': a row with a missing key")
            entities.append(str(row[view.join_key]))
            stamps.append(_epoch_us(row[FEATURE_TIMESTAMP]))
            for i, name in enumerate(names):
                columns[i].append(row.get(name))
    if any(s == NAT_US for s in stamps):
        raise ValueError(f"view '{view.name}': rows with a missing timestamp")
    return entities, stamps, [[python_value(v) for v in column] for column in columns]


def _series_values(series: pd.Series) -> list[Any]:
    """A column as stored Python values, fast for the common dtypes."""
    kind = series.dtype.kind
    if kind == "f":
        return [None if v != v else v for v in series.tolist()]  # NaN != NaN
    if kind in "iub":
        return series.tolist()
    return [python_value(v) for v in series.tolist()]


def _epoch_us(value: Any) -> int:
    """Epoch microseconds of a written row's time (an int passes through; naive = UTC)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dt.datetime | str):
        return datetime_to_epoch_us(value)
    return int(to_epoch_us([value])[0])


def unique_entities(entity_ids: Iterable[Any]) -> list[Any]:
    """The distinct ``entity_ids``, in first-seen order."""
    return list(dict.fromkeys(entity_ids))


def assemble(
    views: Sequence[FeatureView],
    entity_ids: list[Any],
    found: dict[tuple[str, str], tuple[int, list[Any]]],
    as_of: dt.datetime | None,
    names: Sequence[list[str]] | None = None,
) -> OnlineResult:
    """Build the result from {(view, entity string): (event_ts, values in feature order)}.

    ``names``: each view's feature names, when the caller has them already."""
    as_of_us = datetime_to_epoch_us(as_of) if as_of is not None else None
    plan = [
        (
            view.name,
            names[i] if names is not None else view.feature_names,
            None if as_of_us is None else as_of_us - view.ttl_days * DAY_US,
        )
        for i, view in enumerate(views)
    ]
    values: dict[Any, dict[str, Any]] = {}
    stamps: dict[Any, dict[str, int | None]] = {}
    missing = []
    for entity in entity_ids:
        key = str(entity)
        row: dict[str, Any] = {}
        entity_stamps: dict[str, int | None] = {}
        known = False
        for view_name, names, too_old in plan:
            hit = found.get((view_name, key))
            if hit is None or (too_old is not None and hit[0] <= too_old):
                entity_stamps[view_name] = None
                row.update(dict.fromkeys(names))
            else:
                known = True
                entity_stamps[view_name] = hit[0]
                row.update(zip(names, hit[1], strict=True))
        values[entity] = row
        stamps[entity] = entity_stamps
        if not known:
            missing.append(entity)
    return OnlineResult(values=values, missing=missing, event_ts=stamps)


def check_namespace(namespace: str) -> str:
    """``namespace`` if it is a valid platform name (a store's rows are keyed by it)."""
    if not is_name(namespace):
        raise ValueError(f"namespace {namespace!r} does not match {NAME_PATTERN}")
    return namespace
