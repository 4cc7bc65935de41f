"""Apply on-demand features: the same definitions in training (a DataFrame) and serving (rows).

:func:`apply_on_demand` is the one entry point. Given a pandas DataFrame it runs each
function's vectorised form over whole columns; given a list of dict rows (or one dict) it runs
the plain-Python form row by row, which is what a request needs (microseconds, no pandas). Both
give the same values, so a model sees at serving time exactly what it saw in training.

Output types follow the feature's declared ``type``:

- ``numeric``: ``float64`` with ``NaN`` for a missing value in a DataFrame; ``float`` or
  ``None`` in rows.
- ``categorical``: ``object`` with ``None`` in a DataFrame; ``str`` or ``None`` in rows.

Features are applied in their declared order, so one may use an earlier one as input. A missing
input column (or key) counts as a missing value, never an error deep inside a request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

from airmlops.features.on_demand_library import get_function

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.features.definitions import OnDemandFeature


def _row_value(value: Any, output_type: str) -> Any:
    if value is None:
        return None
    if output_type == "numeric":
        if isinstance(value, str):
            return None
        number = float(value)
        return None if math.isnan(number) else number
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _apply_rows(rows: Sequence[Mapping[str, Any]], features: Sequence[OnDemandFeature]) -> list:
    compiled = [
        (feature.name, get_function(feature.function).scalar, tuple(feature.inputs), feature.type)
        for feature in features
    ]
    out = []
    for row in rows:
        new = dict(row)
        for name, scalar, inputs, output_type in compiled:
            new[name] = _row_value(scalar(*[new.get(i) for i in inputs]), output_type)
        out.append(new)
    return out


def on_demand_columns(
    lookup: Callable[[str], Any], n_rows: int, index: Any, features: Sequence[OnDemandFeature]
) -> dict[str, Any]:
    """The vectorised values of ``features`` as {name: numpy array}.

    ``lookup(name)`` returns the input column ``name`` as a pandas Series (or None when there
    is no such column: a missing input is a missing value). Used by :func:`apply_on_demand` and
    by the offline store, which assembles its result only once.
    """
    import numpy as np
    import pandas as pd

    columns: dict[str, Any] = {}
    for feature in features:
        function = get_function(feature.function)
        inputs = []
        for name in feature.inputs:
            if name in columns:
                inputs.append(pd.Series(columns[name], index=index))
                continue
            column = lookup(name)
            if column is None:
                column = pd.Series([None] * n_rows, index=index, dtype=object)
            inputs.append(column)
        values = function.vectorized(*inputs)
        if feature.type == "numeric":
            array = np.asarray(values, dtype="float64")
        else:
            array = np.asarray(
                [_row_value(v, "categorical") for v in pd.Series(values).tolist()], dtype=object
            )
        if len(array) != n_rows:
            raise ValueError(f"on-demand function {feature.function!r} changed the row count")
        columns[feature.name] = array
    return columns


def _apply_frame(frame: pd.DataFrame, features: Sequence[OnDemandFeature]) -> pd.DataFrame:
    import pandas as pd

    clashes = [f.name for f in features if f.name in frame.columns]
    if clashes:
        raise ValueError(f"on-demand feature(s) {clashes} already are columns of the input")

    def lookup(name: str) -> Any:
        return frame[name] if name in frame.columns else None

    columns = on_demand_columns(lookup, len(frame), frame.index, features)
    if not columns:
        return frame.copy()
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)


@overload
def apply_on_demand(data: pd.DataFrame, features: Sequence[OnDemandFeature]) -> pd.DataFrame: ...
@overload
def apply_on_demand(
    data: Mapping[str, Any], features: Sequence[OnDemandFeature]
) -> dict[str, Any]: ...
@overload
def apply_on_demand(
    data: Sequence[Mapping[str, Any]], features: Sequence[OnDemandFeature]
) -> list[dict[str, Any]]: ...


def apply_on_demand(data: Any, features: Sequence[OnDemandFeature]) -> Any:
    """Add the on-demand ``features`` to ``data``; return a new object of the same kind.

    ``data`` is a pandas DataFrame (training: vectorised), a list of dict rows or one dict
    (serving: plain Python). Inputs are request fields or looked-up feature values by name.
    The input is never modified.
    """
    if isinstance(data, Mapping):
        return _apply_rows([data], features)[0]
    if isinstance(data, list | tuple):
        return _apply_rows(data, features)
    if hasattr(data, "columns") and hasattr(data, "index"):
        return _apply_frame(data, features)
    raise TypeError(f"expected a DataFrame, a dict or a list of dicts, got {type(data).__name__}")
