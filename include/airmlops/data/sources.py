"""Pull one data interval from a pipeline spec's source: the simulator, files, or SQL.

:func:`load_batch` returns the rows whose event timestamp lies in ``[start, end)``, with that
column parsed to tz-aware UTC. Every error names the spec field at fault (``source.path``,
``timestamp``, ...), because the person who fixes it is the one who wrote the spec.

- ``simulator``: the labels arrive ``label_delay_days`` after an observation, so only rows whose
  label is known at ``end`` are returned (``timestamp <= end - label_delay_days``).
- ``file``: a CSV or Parquet path or glob, relative to the data root; every file read lies,
  after resolving symbolic links, under the data root or a root in ``allowed_data_roots``.
- ``sql``: a query run through an Airflow connection, with the interval bound as parameters
  (never formatted into the SQL text).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from airmlops.paths import confined_files
from airmlops.spec import FileSource, PipelineSpec, SimulatorSource, SqlSource
from airmlops.times import utc

ConnectionGetter = Callable[[str], Any]
"""Takes a ``conn_id`` and returns a new DB-API or SQLAlchemy connection (closed after use)."""


class SourceError(ValueError):
    """A batch cannot be loaded; the message names the spec field at fault."""


def load_batch(
    spec: PipelineSpec,
    start: dt.datetime,
    end: dt.datetime,
    *,
    scenario: str | None = None,
    connection_getter: ConnectionGetter | None = None,
    data_root: Path | None = None,
) -> pd.DataFrame:
    """The rows of ``spec``'s source whose timestamp is in ``[start, end)`` (tz-aware UTC).

    ``scenario`` overrides the simulator's scenario (simulator sources only).
    ``connection_getter`` replaces the Airflow connection lookup of SQL sources (tests).
    ``data_root`` is where relative file paths live (default: the settings' data root).
    """
    start_utc, end_utc = pd.Timestamp(utc(start, "start")), pd.Timestamp(utc(end, "end"))
    if end_utc < start_utc:
        raise ValueError(f"end ({end_utc}) is before start ({start_utc})")
    source = spec.source
    if scenario is not None and not isinstance(source, SimulatorSource):
        raise ValueError(f"a scenario applies to simulator sources only, not '{source.kind}'")
    if isinstance(source, SimulatorSource):
        return _load_simulator(spec, source, start_utc, end_utc, scenario)
    if isinstance(source, FileSource):
        if data_root is None:
            from airmlops.settings import get_settings

            data_root = get_settings().data_root
        frame = _load_files(spec, source, Path(data_root))
    elif isinstance(source, SqlSource):
        frame = _load_sql(source, start_utc, end_utc, connection_getter)
    else:  # pragma: no cover - the spec's discriminated union has no other kind
        raise SourceError(f"source.kind: unsupported kind {source.kind!r}")
    frame = _parse_timestamp(frame, spec, _describe(source))
    in_interval = (frame[spec.timestamp] >= start_utc) & (frame[spec.timestamp] < end_utc)
    return frame.loc[in_interval].reset_index(drop=True)


def _describe(source: FileSource | SqlSource) -> str:
    if isinstance(source, FileSource):
        return f"source.path {source.path!r}"
    return f"the query of source.conn_id {source.conn_id!r}"


# --- simulator -------------------------------------------------------------------------------


def _load_simulator(spec: PipelineSpec, source: SimulatorSource, start: pd.Timestamp,
                    end: pd.Timestamp, scenario: str | None) -> pd.DataFrame:
    from airmlops.data.simulator import simulate_observations

    label_cutoff = end - pd.Timedelta(days=source.label_delay_days)
    last = min(end, label_cutoff)  # rows at or after `last` are excluded or unlabelled
    first_day = start.date()
    end_day = last.date() + dt.timedelta(days=1)
    frame = simulate_observations(source, first_day, max(first_day, end_day), scenario=scenario)
    stamps = frame[spec.timestamp]
    keep = (stamps >= start) & (stamps < end) & (stamps <= label_cutoff)
    return frame.loc[keep].reset_index(drop=True)


# --- files -----------------------------------------------------------------------------------

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst", ".csv.zip")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _data_roots(data_root: Path) -> tuple[Path, ...]:
    from airmlops.settings import get_settings

    return (Path(data_root), *get_settings().allowed_data_roots)


def _matching_files(source: FileSource, data_root: Path) -> list[Path]:
    """Files matching ``source.path``, sorted, each confined to the data roots (see
    :func:`airmlops.paths.confined_files`)."""
    try:
        files = confined_files(source.path, _data_roots(data_root), field="source.path")
    except ValueError as error:
        raise SourceError(str(error)) from None
    if not files:
        raise SourceError(f"source.path: no file matches {source.path!r} under the data root "
                          f"{str(data_root)!r}")
    return files


def _file_format(path: Path, source: FileSource) -> str:
    if source.format is not None:
        return source.format
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    raise SourceError(
        f"source.format: cannot tell the format of {path.name!r} from its suffix; "
        "set source.format to csv or parquet"
    )


def _load_files(spec: PipelineSpec, source: FileSource, data_root: Path) -> pd.DataFrame:
    frames = []
    for path in _matching_files(source, data_root):
        if _file_format(path, source) == "parquet":
            frames.append(pd.read_parquet(path))
        else:
            frames.append(pd.read_csv(path, dtype={spec.entity_key: str}))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# --- timestamps ------------------------------------------------------------------------------


def _parse_timestamp(frame: pd.DataFrame, spec: PipelineSpec, origin: str) -> pd.DataFrame:
    """Parse the spec's timestamp column to ``datetime64[ns, UTC]`` (naive values are UTC)."""
    column = spec.timestamp
    if column not in frame.columns:
        raise SourceError(
            f"timestamp: column {column!r} is not in the data of {origin} "
            f"(columns: {list(frame.columns)})"
        )
    values = frame[column]
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        parsed = values.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(values.dtype):
        parsed = values.dt.tz_localize("UTC")
    else:
        try:
            parsed = _parse_iso8601(values)
        except (TypeError, ValueError) as error:
            raise SourceError(
                f"timestamp: column {column!r} of {origin} has values that are not "
                f"ISO 8601 timestamps ({error})"
            ) from None
    frame = frame.copy()
    frame[column] = parsed.astype("datetime64[ns, UTC]")
    return frame


_UTC_OFFSET = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)\s*$"
"""A time of day followed by ``Z`` or an offset (a bare date's ``-01`` is not an offset)."""


def _parse_iso8601(values: pd.Series) -> pd.Series:
    """ISO 8601 strings to UTC; values with an offset keep it, values without one are UTC.

    The two kinds are parsed apart: pandas' ISO 8601 parser lends the first value's offset to
    later values that have none.
    """
    text = values.astype("string")
    has_offset = text.str.contains(_UTC_OFFSET, regex=True).fillna(False).astype(bool)
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    for mask in (has_offset, ~has_offset):
        if mask.any():
            parsed[mask] = pd.to_datetime(text[mask], utc=True, format="ISO8601")
    return parsed


# --- SQL -------------------------------------------------------------------------------------

_INTERVAL_TOKEN = re.compile(r"%\((start|end)\)s|(?<![:\w]):(start|end)\b")
_PERCENT_STYLES = ("pyformat", "format")
_PARAMSTYLE_OVERRIDES = {"sqlite3": "named"}  # sqlite3 declares qmark but also takes :name


def bind_interval_parameters(query: str, paramstyle: str, start: Any,
                             end: Any) -> tuple[str, dict[str, Any] | list[Any]]:
    """Map the query's ``%(start)s``/``%(end)s`` or ``:start``/``:end`` to the driver's style.

    Only those fixed tokens are rewritten (plus ``%`` escaping when moving between percent and
    non-percent styles); the values are always bound by the driver, never put in the text.
    Returns the query and the parameters (a dict for named styles, a list for positional ones).
    """
    tokens = list(_INTERVAL_TOKEN.finditer(query))
    written = {"pyformat" if match.group(1) else "named" for match in tokens}
    if len(written) > 1:
        raise SourceError("source.query: use either %(start)s/%(end)s or :start/:end, not both")
    if not tokens:
        raise SourceError("source.query: must bind the interval as %(start)s and %(end)s")
    written_style = written.pop()
    values = {"start": start, "end": end}
    positional: list[Any] = []

    def placeholder(name: str) -> str:
        if paramstyle == "pyformat":
            return f"%({name})s"
        if paramstyle == "named":
            return f":{name}"
        positional.append(values[name])
        if paramstyle == "qmark":
            return "?"
        if paramstyle == "format":
            return "%s"
        return f":{len(positional)}"  # numeric

    if paramstyle not in ("pyformat", "named", "qmark", "format", "numeric"):
        raise SourceError(f"source.conn_id: unsupported driver paramstyle {paramstyle!r}")
    written_percent = written_style == "pyformat"
    target_percent = paramstyle in _PERCENT_STYLES

    def literal(text: str) -> str:
        if written_percent and not target_percent:
            return text.replace("%%", "%")
        if target_percent and not written_percent:
            return text.replace("%", "%%")
        return text

    pieces, last = [], 0
    for match in tokens:
        pieces.append(literal(query[last:match.start()]))
        pieces.append(placeholder(match.group(1) or match.group(2)))
        last = match.end()
    pieces.append(literal(query[last:]))
    parameters: dict[str, Any] | list[Any] = (
        values if paramstyle in ("pyformat", "named") else positional
    )
    return "".join(pieces), parameters


def airflow_connection(conn_id: str) -> Any:
    """A new DB-API connection from the Airflow connection ``conn_id`` (through its SQL hook)."""
    from airflow.providers.common.sql.hooks.sql import DbApiHook
    from airflow.sdk import BaseHook

    try:
        hook = BaseHook.get_connection(conn_id).get_hook()
    except Exception as error:  # Airflow raises several types; all mean "no usable connection"
        raise SourceError(f"source.conn_id: cannot use Airflow connection {conn_id!r}: "
                          f"{error}") from error
    if not isinstance(hook, DbApiHook):
        raise SourceError(f"source.conn_id: Airflow connection {conn_id!r} has no SQL hook "
                          f"(got {type(hook).__name__})")
    return hook.get_conn()


def _dbapi_paramstyle(connection: Any) -> str:
    parts = type(connection).__module__.split(".")
    for size in range(len(parts), 0, -1):
        module_name = ".".join(parts[:size])
        if module_name in _PARAMSTYLE_OVERRIDES:
            return _PARAMSTYLE_OVERRIDES[module_name]
        style = getattr(sys.modules.get(module_name), "paramstyle", None)
        if isinstance(style, str):
            return style
    raise SourceError(f"source.conn_id: cannot tell the paramstyle of a "
                      f"{type(connection).__module__}.{type(connection).__name__} connection")


def _interval_values(start: pd.Timestamp, end: pd.Timestamp,
                     sqlite: bool) -> tuple[Any, Any]:
    if sqlite:
        # SQLite has no timestamp type: values are ISO text ("YYYY-MM-DD HH:MM:SS+00:00", as
        # pandas writes them), which compare correctly as strings.
        return start.isoformat(sep=" "), end.isoformat(sep=" ")
    return start.to_pydatetime(), end.to_pydatetime()


def _load_sql(source: SqlSource, start: pd.Timestamp, end: pd.Timestamp,
              connection_getter: ConnectionGetter | None) -> pd.DataFrame:
    getter = connection_getter or airflow_connection
    connection = getter(source.conn_id)
    if type(connection).__module__.startswith("sqlalchemy."):
        from sqlalchemy.engine import Engine

        if isinstance(connection, Engine):
            with connection.connect() as opened:
                return _run_sqlalchemy(opened, source.query, start, end)
    try:
        if type(connection).__module__.startswith("sqlalchemy."):
            return _run_sqlalchemy(connection, source.query, start, end)
        return _run_dbapi(connection, source.query, start, end)
    finally:
        connection.close()


def _run_dbapi(connection: Any, query: str, start: pd.Timestamp,
               end: pd.Timestamp) -> pd.DataFrame:
    sqlite = type(connection).__module__.split(".")[0] == "sqlite3"
    sql, parameters = bind_interval_parameters(
        query, _dbapi_paramstyle(connection), *_interval_values(start, end, sqlite)
    )
    cursor = connection.cursor()
    try:
        cursor.execute(sql, parameters)
        columns = [description[0] for description in cursor.description or ()]
        rows = cursor.fetchall()
    finally:
        cursor.close()
    return pd.DataFrame.from_records(rows, columns=columns)


def _run_sqlalchemy(connection: Any, query: str, start: pd.Timestamp,
                    end: pd.Timestamp) -> pd.DataFrame:
    from sqlalchemy import text

    # text() always takes :name parameters and adapts them (and any %) to the driver.
    sql, parameters = bind_interval_parameters(
        query, "named", *_interval_values(start, end, connection.dialect.name == "sqlite")
    )
    result = connection.execute(text(sql), parameters)
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def read_files(pattern: str, data_root: Path, *, field: str,
               timestamp_column: str = "event_timestamp",
               entity_key: str | None = None) -> pd.DataFrame:
    """Every CSV/Parquet file matching ``pattern`` (relative to the data root), concatenated,
    with ``timestamp_column`` parsed to UTC. Errors name ``field``, the spec field at fault."""
    # not validated here: confined_files checks the pattern and names ``field`` in its errors
    source = FileSource.model_construct(kind="file", path=pattern, format=None)
    try:
        files = _matching_files(source, data_root)
        frames = [
            pd.read_parquet(path) if _file_format(path, source) == "parquet"
            else pd.read_csv(path, dtype={entity_key: str} if entity_key else None)
            for path in files
        ]
    except SourceError as error:
        raise SourceError(str(error).replace("source.path", field, 1)
                          .replace("source.format", field, 1)) from None
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if timestamp_column not in frame.columns:
        raise SourceError(f"{field}: the files have no {timestamp_column!r} column")
    frame[timestamp_column] = pd.to_datetime(frame[timestamp_column], utc=True, format="ISO8601")
    return frame
