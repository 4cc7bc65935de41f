"""Parity: the online path must return exactly the offline point-in-time values.

:func:`check_parity` takes a sample of entities (plus request fields), reads them through the
online path (online store with ``as_of``, then on-demand features on rows) and through the
offline path (:func:`~airmlops.features.offline.get_historical_features` at ``as_of``, then
on-demand features on a DataFrame), and lists every value that differs. Run it after
materializing up to ``as_of``: the online store then holds each entity's newest row, which is
what the offline store serves at ``as_of``.

:func:`compare_with_offline` is the form for live traffic (the monitoring issue): given logged
requests (entity keys, request time, request fields and the feature values the service used),
it recomputes the offline values at each request's time and lists the differences.

Equality: two missing values (``None``/``NaN``) are equal; numbers compare as floats, exactly
unless a tolerance is given (``3`` equals ``3.0``); anything else by ``==``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.features.definitions import FEATURE_TIMESTAMP, FeatureView, OnDemandFeature
from airmlops.times import assume_utc

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.features.online import OnlineStore


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One differing value: the sample row (position), the feature and both values."""

    row: int
    entity: dict[str, Any]
    feature: str
    offline: Any
    online: Any


@dataclasses.dataclass(frozen=True)
class ParityReport:
    rows: int
    features: list[str]
    mismatches: list[Mismatch]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "features": self.features,
            "mismatch_count": len(self.mismatches),
            "mismatches": [dataclasses.asdict(m) for m in self.mismatches[:100]],
        }


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, float) and math.isnan(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) or type(value).__module__ == "numpy"


def values_equal(a: Any, b: Any, *, rel_tol: float = 0.0, abs_tol: float = 0.0) -> bool:
    """Null-aware equality; see the module docstring."""
    if _is_missing(a) or _is_missing(b):
        return _is_missing(a) and _is_missing(b)
    if _is_number(a) and _is_number(b) and not isinstance(a, str) and not isinstance(b, str):
        x, y = float(a), float(b)
        if rel_tol == 0.0 and abs_tol == 0.0:
            return x == y
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)
    return bool(a == b)


def compare_rows(
    offline_rows: Sequence[Mapping[str, Any]],
    online_rows: Sequence[Mapping[str, Any]],
    features: Sequence[str],
    *,
    keys: Sequence[str] = (),
    rel_tol: float = 0.0,
    abs_tol: float = 0.0,
) -> list[Mismatch]:
    """Every (row, feature) whose values differ between two aligned lists of rows."""
    if len(offline_rows) != len(online_rows):
        raise ValueError(f"{len(offline_rows)} offline rows but {len(online_rows)} online rows")
    mismatches = []
    for position, (expected, actual) in enumerate(zip(offline_rows, online_rows, strict=True)):
        for feature in features:
            a, b = expected.get(feature), actual.get(feature)
            if not values_equal(a, b, rel_tol=rel_tol, abs_tol=abs_tol):
                mismatches.append(
                    Mismatch(
                        row=position,
                        entity={k: expected.get(k) for k in keys},
                        feature=feature,
                        offline=None if _is_missing(a) else a,
                        online=None if _is_missing(b) else b,
                    )
                )
    return mismatches


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dict(orient="records")


def check_parity(
    sample: pd.DataFrame,
    views: Sequence[FeatureView],
    on_demand: Sequence[OnDemandFeature],
    root: Path,
    pipeline: str,
    store: OnlineStore,
    as_of: dt.datetime,
    *,
    timestamp_column: str = FEATURE_TIMESTAMP,
    rel_tol: float = 0.0,
    abs_tol: float = 0.0,
) -> ParityReport:
    """Compare the online and the offline path for ``sample`` at ``as_of``.

    ``sample`` has the views' join keys and the request fields the on-demand features use;
    its ``timestamp_column`` (added if absent) is set to ``as_of`` for both paths. The online
    path costs one store round trip per distinct entity type.
    """
    import pandas as pd

    from airmlops.features.offline import get_historical_features
    from airmlops.features.on_demand import apply_on_demand

    as_of = assume_utc(as_of)
    requests = sample.reset_index(drop=True).copy()
    requests[timestamp_column] = pd.Timestamp(as_of)
    offline = get_historical_features(
        requests, views, root, pipeline, timestamp_column=timestamp_column, on_demand=on_demand
    )

    online_rows = [{**row, timestamp_column: as_of} for row in _records(requests)]
    by_key: dict[str, list[FeatureView]] = {}
    for view in views:
        by_key.setdefault(view.join_key, []).append(view)
    for join_key, key_views in by_key.items():
        ids = requests[join_key].tolist()
        result = store.read(key_views, ids, as_of=as_of)
        for row, entity in zip(online_rows, ids, strict=True):
            row.update(result.values[entity])
    online_rows = apply_on_demand(online_rows, on_demand)

    features = [n for v in views for n in v.feature_names] + [f.name for f in on_demand]
    mismatches = compare_rows(
        _records(offline), online_rows, features, keys=list(by_key), rel_tol=rel_tol,
        abs_tol=abs_tol,
    )
    return ParityReport(rows=len(requests), features=features, mismatches=mismatches)


def compare_with_offline(
    logged: pd.DataFrame,
    views: Sequence[FeatureView],
    on_demand: Sequence[OnDemandFeature],
    root: Path,
    pipeline: str,
    *,
    timestamp_column: str = FEATURE_TIMESTAMP,
    rel_tol: float = 0.0,
    abs_tol: float = 0.0,
) -> ParityReport:
    """Compare logged online feature values with the offline values at each request's time.

    ``logged`` has the join keys, ``timestamp_column`` (the request time), the request fields
    and one column per feature as served; features absent from ``logged`` are not compared.
    """
    from airmlops.features.offline import get_historical_features

    features = [
        n for n in [*(n for v in views for n in v.feature_names), *(f.name for f in on_demand)]
        if n in logged.columns
    ]
    logged = logged.reset_index(drop=True)
    inputs = logged.drop(columns=features)
    offline = get_historical_features(
        inputs, views, root, pipeline, timestamp_column=timestamp_column, on_demand=on_demand
    )
    keys = list(dict.fromkeys(v.join_key for v in views))
    mismatches = compare_rows(
        _records(offline), _records(logged), features, keys=keys, rel_tol=rel_tol,
        abs_tol=abs_tol,
    )
    return ParityReport(rows=len(logged), features=features, mismatches=mismatches)

