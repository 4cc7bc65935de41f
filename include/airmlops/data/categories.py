"""The one canonical text of a categorical cell, shared by validation, training, serving and
monitoring.

The same category reaches the platform in many shapes: a CSV column of ``True``/``False`` is
read by pandas as Python booleans, a Parquet column as numpy booleans, a SQL query may answer
``0``/``1``, a JSON request ``true``, a spec author writes ``"True"``; an integer-coded column
with one empty cell is read as floats (``1.0``), so ``str()`` makes ``"1.0"`` where another
batch says ``"1"``. Every stage that compares or encodes categories passes cells through
:func:`category` (one value) or :func:`category_series` (a column), so they all see the same
text: ``"true"``/``"false"`` for booleans, ``"1"`` for an integral number, the string itself
otherwise.

pandas and numpy are imported inside the functions (the spec module imports this one at DAG
parse time).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

BOOLEAN_VALUES = ("false", "true")
"""The categories of a ``type: boolean`` feature, in the order they sort."""

_BOOLEAN_WORDS = {"true": "true", "false": "false"}
_BOOLEAN_DIGITS = {"1": "true", "0": "false"}


def category(value: Any, *, boolean: bool = False) -> str | None:
    """The canonical text of one categorical cell, or None when it is missing.

    None, NaN and pandas' NA are missing. Booleans (Python or numpy) and strings equal to
    "true"/"false" in any case become ``"true"``/``"false"``; integers and integral floats
    their integer text (``1.0`` -> ``"1"``); other floats ``str(float)``; other strings stay as
    they are. With ``boolean`` (a ``type: boolean`` feature) 1 and 0 (integers, integral floats
    or the strings "1"/"0") are true and false too; any other value keeps its text, so that
    validation can report it.
    """
    kind = type(value)
    if kind is str:
        return _text(value, boolean)
    if value is None:
        return None
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return _integer(value, boolean)
    if kind is float:
        return _float(value, boolean)
    return _other(value, boolean)


def _text(value: str, boolean: bool) -> str:
    word = _BOOLEAN_WORDS.get(value.lower()) if len(value) <= 5 else None
    if word is not None:
        return word
    if boolean:
        return _BOOLEAN_DIGITS.get(value, value)
    return value


def _integer(value: int, boolean: bool) -> str:
    if boolean and value in (0, 1):
        return "true" if value else "false"
    return str(value)


def _float(value: float, boolean: bool) -> str | None:
    if math.isnan(value):
        return None
    if value.is_integer():
        return _integer(int(value), boolean)
    return str(value)


def _other(value: Any, boolean: bool) -> str | None:
    """numpy scalars, pandas' missing markers and anything else (its ``str``)."""
    import numpy as np
    import pandas as pd

    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.bool_):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return _integer(int(value), boolean)
    if isinstance(value, numbers.Real):
        return _float(float(value), boolean)
    if isinstance(value, str):  # a str subclass, e.g. numpy.str_
        return _text(str(value), boolean)
    return str(value)


def category_series(series: pd.Series, *, boolean: bool = False) -> pd.Series:
    """:func:`category` of every cell of ``series``: an object Series, NaN where missing.

    Each distinct value is converted once and the result spread back by position, so a
    million-row column costs one factorisation plus one call per distinct value. In an object
    column, ``True == 1`` (and ``False == 0``) hash alike and would be taken for one value;
    rows holding such a value are converted one by one unless ``boolean`` makes them agree.
    """
    import numpy as np
    import pandas as pd

    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    texts = [category(value, boolean=boolean) for value in uniques]
    table = np.array([np.nan if text is None else text for text in texts] + [np.nan],
                     dtype=object)
    values = table[codes]  # code -1 (missing) picks the trailing NaN
    if not boolean and series.dtype == object and _may_mix_booleans(series):
        ambiguous = [i for i, value in enumerate(uniques) if _equals_zero_or_one(value)]
        if ambiguous:
            rows = np.isin(codes, ambiguous)
            cells = series.to_numpy(dtype=object)[rows]
            values[rows] = [_or_nan(category(cell)) for cell in cells]
    return pd.Series(values, index=series.index, name=series.name, dtype=object)


_ONE_KIND = frozenset({"empty", "boolean", "string", "integer", "floating",
                       "mixed-integer-float"})
"""What ``infer_dtype`` says of an object column whose booleans cannot meet other numbers."""


def _may_mix_booleans(series: pd.Series) -> bool:
    """Whether an object column may hold both booleans and numbers (one pass in C)."""
    import pandas as pd

    return pd.api.types.infer_dtype(series, skipna=True) not in _ONE_KIND


def _equals_zero_or_one(value: Any) -> bool:
    """Whether ``value`` is a non-string that equals 0 or 1 (so it may stand for a boolean,
    or a boolean for it, in a hash table)."""
    if isinstance(value, str):
        return False
    if not isinstance(value, numbers.Number) and type(value).__module__ != "numpy":
        return False
    try:
        return bool(value == 0 or value == 1)
    except (TypeError, ValueError):
        return False


def _or_nan(text: str | None) -> Any:
    return math.nan if text is None else text
