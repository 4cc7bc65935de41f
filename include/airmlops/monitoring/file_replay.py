"""Replay a file of your own history to a deployed model: its rows to ``/predict`` in time
order, their labels to ``/feedback`` later.

The simulator replay (:mod:`airmlops.monitoring.replay`) only knows the built-in simulator; this
one sends the rows of one CSV or Parquet file, for any pipeline. It shares the simulator
replay's sending loop (:func:`~airmlops.monitoring.replay.send_and_label`), so the pacing, the
label delay, the seeded label share and the bounds are the same.

The file must have the spec's entity key, request fields and timestamp columns, and its label
column unless no label is posted (``label_share`` 0). Its rows are sorted by the timestamp
(parsed like ingest parses it: ISO 8601, naive times are UTC; a stable sort, so rows of the same
time keep their file order) and sent in that order, the entity key and the request fields only.
A row whose label is missing is sent but its label is not posted. Rows are numbered as in the
file: row 1 is the first data row (the line after a CSV's header).

A dry run (``dry_run=True``) sends nothing that is logged: it validates every row against the
service's own request model (:func:`airmlops.serving.service.request_models`) and every label
against its feedback model, and reports the rows at fault with the field and what was expected;
then, if the service answers, it sends one batch of good rows marked as synthetic
(:mod:`airmlops.serving.synthetic`: answered, not logged) to check that the live service accepts
them (it also knows which entities its online store has) and to report the model version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from airmlops.monitoring.replay import (
    MAX_ROWS,
    Progress,
    ReplayError,
    ReplayResult,
    Report,
    _check_bounds,
    _plain,
    auth_headers,
    check_url,
    http_client,
    predict_once,
    request_instances,
    send_and_label,
)

if TYPE_CHECKING:
    import httpx
    import pandas as pd
    from pydantic import BaseModel

    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_PROBLEMS = 20
"""How many row problems a dry run lists (``invalid_rows`` counts them all)."""
PROGRESS_EVERY = 0.5
"""Seconds between two progress lines (the last line comes at the end whatever the time)."""
BAR_WIDTH = 20


# --- reading the file ------------------------------------------------------------------------


def _file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ReplayError(f"{path}: cannot tell the format from the suffix "
                          f"{path.suffix or '(none)'!r}; expected a .csv, .parquet or .pq file")
    return fmt


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[IO[bytes]]:
    """``path`` opened for reading once its symbolic links are resolved, if it is a regular file
    (not a directory, a device or a pipe, which could block or never end)."""
    try:
        real = path.resolve(strict=True)
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ReplayError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ReplayError(f"{path}: is not a regular file (resolved to {real}); expected a "
                          "CSV or Parquet file")
    with os.fdopen(descriptor, "rb") as handle:
        yield handle


def needed_columns(spec: PipelineSpec, with_label: bool) -> dict[str, str]:
    """The columns a replay of ``spec`` reads, each with what it is for."""
    roles = {spec.entity_key: "entity key"}
    for name in spec.request_fields:
        roles.setdefault(name, "request field")
    roles.setdefault(spec.timestamp, "timestamp")
    if with_label:
        roles.setdefault(spec.label, "label")
    return roles


def _check_columns(path: Path, present: list[str], roles: dict[str, str]) -> None:
    missing = [f"{name!r} ({role})" for name, role in roles.items() if name not in present]
    if missing:
        raise ReplayError(f"{path}: the file lacks the column{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}; the spec needs its entity key, request "
                          f"fields, timestamp and (to post labels) label as columns "
                          f"(the file has: {present[:30]})")


def _text_columns(spec: PipelineSpec, columns: list[str]) -> dict[str, Any]:
    """The CSV columns read as text: the entity key (as ingest reads it) and the request fields
    the service takes as strings (categories, and the timestamp when it is a request field),
    so that a category ``"1"`` is not read as the number 1 (or ``1.0`` when a cell is empty).
    Numeric and boolean columns keep pandas' types (a boolean column stays booleans)."""
    typed = {f.name for f in spec.features if f.type in ("numeric", "boolean")}
    return {name: str for name in columns
            if name == spec.entity_key or (name in spec.request_fields and name not in typed)}


def _numbers_where_possible(values: pd.Series) -> pd.Series:
    """A CSV column of numbers with a few text cells is read as text throughout: its cells that
    are numbers become numbers again, the others stay text for the checks to name."""
    import pandas as pd

    if values.dtype != object:
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().all():
        return values
    return numbers.astype(object).where(numbers.notna() | values.isna(), values)


def _typed_columns(spec: PipelineSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its numeric request fields and its label as numbers where a cell is one
    (see :func:`_numbers_where_possible`)."""
    numeric = [f.name for f in spec.features
               if f.type == "numeric" and f.name in spec.request_fields]
    for name in [*numeric, spec.label]:
        if name in frame.columns:
            frame[name] = _numbers_where_possible(frame[name])
    return frame


def _json_rows(spec: PipelineSpec, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The ``/predict`` rows of ``frame`` (:func:`request_instances`: JSON-safe, NaN as null).
    A boolean feature keeps JSON booleans; its 0/1 read as ``0.0``/``1.0`` (a CSV column with
    an empty cell is read as floats) become false/true, as the service takes 0/1 but not 0.0."""
    rows = request_instances(spec, frame)
    flags = [f.name for f in spec.features if f.type == "boolean" and f.name in frame.columns]
    for row in rows:
        for name in flags:
            value = row.get(name)
            if type(value) is float and value in (0.0, 1.0):
                row[name] = value == 1.0
    return rows


def _csv(handle: IO[bytes], path: Path, **options: Any) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_csv(handle, **options)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ReplayError(f"{path}: is not a readable CSV file ({error})") from None


def _read_csv(handle: IO[bytes], path: Path, spec: PipelineSpec, roles: dict[str, str],
              limit: int) -> pd.DataFrame:
    _check_columns(path, list(_csv(handle, path, nrows=0).columns), roles)
    handle.seek(0)
    return _csv(handle, path, usecols=list(roles), nrows=limit + 1,
                dtype=_text_columns(spec, list(roles)))


def _read_parquet(handle: IO[bytes], path: Path, roles: dict[str, str],
                  limit: int) -> pd.DataFrame:
    """The ``roles`` columns of the first ``limit + 1`` rows (one more tells a file over the
    limit), read batch by batch so that a large file is not read whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(handle)
        _check_columns(path, list(parquet.schema_arrow.names), roles)
        batches, count = [], 0
        for batch in parquet.iter_batches(batch_size=65_536, columns=list(roles)):
            batches.append(batch)
            count += batch.num_rows
            if count > limit:
                break
        if not batches:
            schema = parquet.schema_arrow
            return pa.schema([schema.field(name) for name in roles]).empty_table().to_pandas()
        return pa.Table.from_batches(batches).slice(0, limit + 1).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise ReplayError(f"{path}: is not a readable Parquet file ({error})") from None


def _event_times(frame: pd.DataFrame, path: Path, column: str) -> pd.Series:
    """The timestamp column as UTC instants, parsed as ingest parses it; an error names the
    rows whose value is missing or not an ISO 8601 date-time."""
    import pandas as pd

    from airmlops.data.sources import _parse_iso8601

    values = frame[column]
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        parsed = values.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(values.dtype):
        parsed = values.dt.tz_localize("UTC")
    elif pd.api.types.is_numeric_dtype(values.dtype) and not values.isna().all():
        raise ReplayError(f"{path}: the timestamp column {column!r} holds numbers; expected "
                          "ISO 8601 date-times such as 2026-06-01T12:00:00Z")
    else:
        try:
            parsed = _parse_iso8601(values)
        except (TypeError, ValueError, OverflowError):
            parsed = pd.to_datetime(values.astype("string"), utc=True, format="ISO8601",
                                    errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        rows = frame.index[bad]
        shown = ", ".join(f"row {row} ({values[row]!r})" for row in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise ReplayError(f"{path}: the timestamp column {column!r} has values that are missing "
                          f"or not ISO 8601 date-times: {shown}{more}; expected e.g. "
                          "2026-06-01T12:00:00Z")
    return parsed


def read_replay_file(spec: PipelineSpec, path: Path | str, *, rows: int | None = None,
                     with_label: bool = True) -> pd.DataFrame:
    """The rows of ``path`` to replay, in time order (a stable sort by the spec's timestamp).

    Only the columns the replay needs (:func:`needed_columns`); the index is the file's row
    number (1 = the first data row). At most ``rows`` rows, the first of the file; without
    ``rows`` a file of more than :data:`MAX_ROWS` rows is refused.
    """
    import numpy as np
    import pandas as pd

    path = Path(path)
    fmt = _file_format(path)
    limit = MAX_ROWS if rows is None else rows
    roles = needed_columns(spec, with_label)
    with _open_regular(path) as handle:
        if fmt == "csv":
            frame = _read_csv(handle, path, spec, roles, limit)
        else:
            frame = _read_parquet(handle, path, roles, limit)
    if len(frame) > limit:
        if rows is not None:
            frame = frame.iloc[:limit]
        else:
            raise ReplayError(f"{path}: has more than {MAX_ROWS:,} rows; pass rows (--rows) to "
                              "replay the first ones, or split the file")
    if frame.empty:
        raise ReplayError(f"{path}: has no rows")
    frame.index = pd.RangeIndex(1, len(frame) + 1)
    frame = _typed_columns(spec, frame)
    times = _event_times(frame, path, spec.timestamp)
    order = np.argsort(times.dt.tz_localize(None).to_numpy(), kind="stable")
    return frame.iloc[order]


# --- the dry run -----------------------------------------------------------------------------


def _row_problems(model: type[BaseModel], body: dict[str, Any], row: int, prefix: str,
                  name: str = "") -> list[str]:
    """The service's own description of what is wrong with one row's body, one line per field,
    as ``row 7: tenure_days: Input should be ... (got -3)`` (``prefix``, the body's path to the
    row, is replaced by ``name``); none if the body is valid."""
    from pydantic import ValidationError

    from airmlops.serving.service import describe_errors

    try:
        model.model_validate(body)
    except ValidationError as error:
        parts = describe_errors(error, limit=50).removeprefix(prefix).split("; " + prefix)
        return [f"row {row}: {name}{part}" for part in parts]
    return []


def _refused_chunks(model: type[BaseModel], bodies: Iterator[tuple[int, dict[str, Any]]]
                    ) -> Iterator[int]:
    """The offsets of the chunk bodies ``model`` refuses (most files have none: validating a
    chunk whole is much faster than row by row)."""
    from pydantic import ValidationError

    for offset, body in bodies:
        try:
            model.model_validate(body)
        except ValidationError:
            yield offset


def _request_problems(spec: PipelineSpec, instances: list[dict[str, Any]], numbers: list[int],
                      batch_size: int) -> dict[int, list[str]]:
    """Per file row, what the service's request model refuses in it (each batch as it will be
    sent, then the rows of a refused batch one by one)."""
    from airmlops.serving.service import request_models

    predict_model, _ = request_models(spec, batch_size)
    chunks = ((offset, {"instances": instances[offset:offset + batch_size]})
              for offset in range(0, len(instances), batch_size))
    found: dict[int, list[str]] = {}
    for offset in _refused_chunks(predict_model, chunks):
        for index in range(offset, min(offset + batch_size, len(instances))):
            problems = _row_problems(predict_model, {"instances": [instances[index]]},
                                     numbers[index], "instances[0].")
            if problems:
                found[numbers[index]] = problems
    return found


def _label_problems(spec: PipelineSpec, labels: list[Any],
                    numbers: list[int]) -> dict[int, list[str]]:
    """Per file row, what the service's feedback model refuses in its label (0/1/true/false
    for binary classification, a finite number for regression); a missing label is fine (it
    is not posted). Only the label is checked here: the entity is the request's."""
    from airmlops.serving.service import request_models

    chunk = 1000
    _, feedback_model = request_models(spec, chunk)
    known = [(row, label) for row, label in zip(numbers, labels, strict=True)
             if label is not None]

    def body(items: list[tuple[int, Any]]) -> dict[str, Any]:
        return {"request_id": "0" * 32,
                "labels": [{"entity": "e", "label": label} for _, label in items]}

    chunks = ((offset, body(known[offset:offset + chunk]))
              for offset in range(0, len(known), chunk))
    found: dict[int, list[str]] = {}
    for offset in _refused_chunks(feedback_model, chunks):
        for row, label in known[offset:offset + chunk]:
            problems = _row_problems(feedback_model, body([(row, label)]), row,
                                     "labels[0].label", name=spec.label)
            if problems:
                found[row] = problems
    return found


def _first_good_batch(instances: list[dict[str, Any]], numbers: list[int],
                      found: dict[int, list[str]], batch_size: int
                      ) -> list[dict[str, Any]] | None:
    """The first batch (as it would be sent) with no problem in any of its rows."""
    for offset in range(0, len(instances), batch_size):
        stop = min(offset + batch_size, len(instances))
        if not any(numbers[i] in found for i in range(offset, stop)):
            return instances[offset:stop]
    return None


def _live_check(http: httpx.Client, base: str, headers: dict[str, str],
                batch: list[dict[str, Any]] | None, result: ReplayResult) -> None:
    """Send ``batch`` once, marked as synthetic (answered, not logged), if the service answers;
    a refusal is a problem, no answer is not (the dry run then checked the file alone)."""
    import httpx

    from airmlops.serving.synthetic import synthetic_headers

    if batch is None:
        result.live_check = "skipped: no batch passed the local checks"
        return
    try:
        http.get(f"{base}/livez", headers=headers)
    except httpx.HTTPError as error:
        result.live_check = f"skipped: {base} does not answer ({type(error).__name__})"
        return
    errors = result.errors
    request_id = predict_once(http, base, {**headers, **synthetic_headers("replay-dry-run")},
                              batch, result)
    if request_id is None:
        sample = result.error_samples[-1] if result.errors > errors else "no answer"
        result.live_check = "refused the first batch"
        result.problems.append(f"the service at {base} refused the first batch of good rows: "
                               f"{sample}")
        return
    versions = ", ".join(result.model_versions)
    result.live_check = f"accepted {len(batch)} rows (model version {versions})"


def _dry_run(spec: PipelineSpec, base: str, frame: pd.DataFrame, instances: list[dict[str, Any]],
             labels: list[Any], result: ReplayResult, *, batch_size: int, check_labels: bool,
             http: httpx.Client, headers: dict[str, str]) -> ReplayResult:
    """Check every row and label locally, then one batch of good rows live; findings go to
    ``result`` (``problems`` lists the first :data:`MAX_PROBLEMS`, in file row order)."""
    numbers = [int(n) for n in frame.index]
    found = _request_problems(spec, instances, numbers, batch_size)
    if check_labels:
        for row, problems in _label_problems(spec, labels, numbers).items():
            found.setdefault(row, []).extend(problems)
    result.dry_run = True
    result.rows_checked = len(instances)
    result.invalid_rows = len(found)
    result.problems = [p for row in sorted(found) for p in found[row]][:MAX_PROBLEMS]
    _live_check(http, base, headers, _first_good_batch(instances, numbers, found, batch_size),
                result)
    return result


# --- progress --------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(state: Progress) -> str:
    """One line: ``[########------------] 40% 800/2000 rows · 12.3 req/s · 0 errors · 640 labels
    posted · eta 9s``."""
    result, total = state.result, state.rows_total
    share = result.rows_sent / total if total else 1.0
    filled = min(BAR_WIDTH, int(share * BAR_WIDTH))
    rate = result.requests / state.elapsed if state.elapsed > 0 else 0.0
    return (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {share:.0%} "
            f"{result.rows_sent}/{total} rows · {rate:.1f} req/s · {result.errors} errors · "
            f"{result.labels_posted} labels posted · eta {_duration(state.eta)}")


def _every_half_second(progress: Callable[[str], None]) -> Report:
    """A report that gives ``progress`` a :func:`progress_line` at most every
    :data:`PROGRESS_EVERY` seconds, and the last one at the end."""
    last = 0.0

    def report(state: Progress) -> None:
        nonlocal last
        if state.final or state.elapsed - last >= PROGRESS_EVERY:
            last = state.elapsed
            progress(progress_line(state))

    return report


# --- the replay ------------------------------------------------------------------------------


def replay_file(url: str, spec: PipelineSpec, path: Path | str, *, rate: float,
                batch_size: int = 1, label_delay: float = 5.0, label_share: float = 1.0,
                max_seconds: float = 120.0, rows: int | None = None, dry_run: bool = False,
                seed: int = 0, token: str | None = None, allow_remote: bool = False,
                client: httpx.Client | None = None,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep,
                progress: Callable[[str], None] | None = None) -> ReplayResult:
    """Send the rows of the CSV or Parquet file ``path`` (at most ``rows``, the file's first) in
    time order to ``url`` at ``rate`` requests per second, ``batch_size`` rows a request, and
    post the labels of a seeded ``label_share`` of the answered requests ``label_delay``
    seconds later; stop after ``max_seconds``. ``progress`` gets a one-line progress bar at most
    every half second and at the end. With ``dry_run``, check the rows instead (see the module
    docstring). Bad bounds, URL or file raise :class:`ReplayError` before anything is sent."""
    base = check_url(url, allow_remote)
    _check_bounds(MAX_ROWS if rows is None else rows, rate, batch_size, max_seconds,
                  label_delay, label_share)
    path = Path(path)
    with_label = label_share > 0
    frame = read_replay_file(spec, path, rows=rows, with_label=with_label)
    instances = _json_rows(spec, frame)
    entities = [row[spec.entity_key] for row in instances]
    labels = ([_plain(v) for v in frame[spec.label].tolist()] if with_label
              else [None] * len(frame))
    result = ReplayResult(scenario=f"file: {path.name}")
    headers = auth_headers(token)
    started = clock()
    with http_client(client) as http:
        if dry_run:
            _dry_run(spec, base, frame, instances, labels, result, batch_size=batch_size,
                     check_labels=with_label, http=http, headers=headers)
            result.seconds = round(clock() - started, 3)
        else:
            send_and_label(base, instances, entities, labels, result, http=http,
                           headers=headers, rate=rate, batch_size=batch_size,
                           label_delay=label_delay, label_share=label_share,
                           max_seconds=max_seconds, seed=seed, clock=clock, sleep=sleep,
                           report=_every_half_second(progress) if progress else None)
    log.info("replay %s (%s): %s", spec.name, result.scenario, result.to_dict())
    return result
