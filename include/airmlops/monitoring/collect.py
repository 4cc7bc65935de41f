"""The monitoring DAG's collect stage: one window of the prediction log, as Parquet.

:func:`collect_window` reads one window of the prediction log and writes it as Parquet under
``<data_root>/monitoring/<pipeline>/windows/<window_id>/`` (rewritten whole on a retry):
``predictions.parquet`` (one row per prediction, one column per model input) and
``labelled.parquet`` (the labels that arrived in the window, joined with their predictions).

A SQLite-logged window is read in time slices; of each slice only the needed columns are read,
its ``features`` JSON is parsed in one call
(:func:`~airmlops.serving.prediction_log.read_prediction_features`), its columns are built
directly and it is written as the file's next row group before the next slice is read. So
memory holds one slice and the few key columns the label join needs, never the whole window.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.windows import parse_window_id, window_dir, window_id_for
from airmlops.paths import safe_join
from airmlops.times import utc

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
LABELLED_FILE = "labelled.parquet"
READ_SLICES = 8
"""A SQLite-logged window is read in this many time slices, each flattened and written before
the next is read, so the JSON of only one slice is in memory at a time."""
LOG_COLUMNS = ("ts", "request_id", "entity_id", "position", "model_version", "prediction")
LABELLED_COLUMNS = ("ts", "request_id", "entity_id", "model_version", "prediction", "label",
                    "label_ts")


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    import io

    from airmlops.paths import atomic_write_bytes

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def flatten_predictions(log_frame: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """Prediction-log rows as one row per prediction: the log's keys, the model output as
    ``prediction`` (the positive-class probability for classification) and one column per model
    input from the logged ``features`` (an input absent from a row is null)."""
    import pandas as pd

    features = pd.DataFrame.from_records(
        [row if isinstance(row, dict) else {} for row in log_frame["features"]],
        columns=spec.input_names)
    return flatten_prediction_columns(log_frame, features, spec)


def flatten_prediction_columns(keys: pd.DataFrame, features: pd.DataFrame,
                               spec: PipelineSpec) -> pd.DataFrame:
    """:func:`flatten_predictions` of the log's key columns and the logged features' values
    (one column per model input)."""
    import pandas as pd

    clashes = sorted(set(spec.input_names) & set(LOG_COLUMNS))
    if clashes:
        raise ValueError(f"model input(s) {clashes} clash with prediction-log columns")
    output = "probability" if spec.task == "binary_classification" else "prediction"
    frame = pd.DataFrame({
        "ts": keys["ts"], "request_id": keys["request_id"].astype(str),
        "entity_id": keys["entity_id"].astype(str),
        "position": keys["position"].astype("int64"),
        "model_version": keys["model_version"].astype(str),
        "prediction": pd.to_numeric(keys[output], errors="coerce").astype("float64"),
    }).reset_index(drop=True)
    for name, kind in spec.input_types.items():
        column = features[name]
        if kind == "numeric":
            frame[name] = pd.to_numeric(column, errors="coerce").astype("float64")
        else:
            frame[name] = column.astype(object).where(column.notna(), None).map(
                lambda value: None if value is None else str(value))
    return frame


def window_schema(spec: PipelineSpec) -> pa.Schema:
    """The Arrow schema of ``predictions.parquet``: the log's keys, then every model input
    (float64 numbers, text categories), whatever one slice of the log happens to hold."""
    import pyarrow as pa

    fields = [pa.field("ts", pa.timestamp("ns", tz="UTC")), pa.field("request_id", pa.string()),
              pa.field("entity_id", pa.string()), pa.field("position", pa.int64()),
              pa.field("model_version", pa.string()), pa.field("prediction", pa.float64())]
    fields += [pa.field(name, pa.float64() if kind == "numeric" else pa.string())
               for name, kind in spec.input_types.items()]
    return pa.schema(fields)


def write_window_predictions(spec: PipelineSpec, start: dt.datetime, end: dt.datetime,
                             settings: Settings, path: Path) -> pd.DataFrame:
    """Write the window's predictions, flattened (:func:`flatten_predictions`), to ``path``
    atomically, one row group per time slice; return their :data:`LOG_COLUMNS`.

    SQLite is read in :data:`READ_SLICES` time slices (a Redis stream in one pass: each read
    scans the stream from its start to the end).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airmlops.paths import atomic_replace
    from airmlops.serving.prediction_log import log_redis_url, read_prediction_features

    slices = 1 if log_redis_url(settings) else READ_SLICES
    step = (end - start) / slices
    bounds = [start + i * step for i in range(slices)] + [end]
    schema = window_schema(spec)
    kept: list[pd.DataFrame] = []

    def write(temporary: Path) -> None:
        with pq.ParquetWriter(temporary, schema) as writer:
            for lower, upper in itertools.pairwise(bounds):
                read = read_prediction_features(spec.name, lower, upper, spec.input_names,
                                                settings=settings)
                part = flatten_prediction_columns(read.keys, read.features, spec)
                del read
                if len(part):
                    writer.write_table(pa.Table.from_pandas(part, schema=schema,
                                                            preserve_index=False))
                kept.append(part[list(LOG_COLUMNS)])

    atomic_replace(path, write)
    return pd.concat(kept, ignore_index=True) if len(kept) > 1 else kept[0]


def _collected_predictions(settings: Settings, pipeline: str, lookback_start: dt.datetime,
                           start: dt.datetime, request_ids: list[str]) -> pd.DataFrame:
    """Predictions with the given request ids from the windows collected before ``start`` and
    ending after ``lookback_start`` (their ``predictions.parquet``: no log re-read)."""
    import pandas as pd
    import pyarrow.parquet as pq

    root = safe_join(settings.data_root, "monitoring", pipeline, "windows")
    frames = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            window_start, window_end = parse_window_id(folder.name)
        except ValueError:
            continue
        path = folder / PREDICTIONS_FILE
        if window_end <= lookback_start or window_start >= start or not path.is_file():
            continue
        if pq.ParquetFile(path).metadata.num_rows == 0:
            continue  # a window without traffic: its empty columns have no type to filter on
        frames.append(pd.read_parquet(path, columns=list(LOG_COLUMNS),
                                      filters=[("request_id", "in", request_ids)]))
    if not frames:
        return pd.DataFrame({name: pd.Series(dtype="object") for name in LOG_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def collect_window(spec: PipelineSpec, window_start: dt.datetime, window_end: dt.datetime,
                   settings: Settings) -> dict[str, Any]:
    """Read the window's predictions and the labels that arrived during it, write both as Parquet.

    ``predictions.parquet``: the predictions with ``window_start <= ts < window_end``, flattened
    (:func:`write_window_predictions`). ``labelled.parquet``: every label received in the window
    joined with its prediction, made in this window or in an earlier collected window ending
    less than ``monitoring.performance.label_lookback_windows`` window lengths before this
    one's end (read from those windows' Parquet files, so the log is read once per window).
    Labels of older, uncollected or unknown predictions are counted as unmatched.
    """
    import pandas as pd

    from airmlops.serving.prediction_log import read_labels

    start, end = utc(window_start, "window_start"), utc(window_end, "window_end")
    window_id = window_id_for(start, end)
    directory = window_dir(settings, spec.name, window_id)
    predictions_path = directory / PREDICTIONS_FILE
    current = write_window_predictions(spec, start, end, settings, predictions_path)
    labels = read_labels(spec.name, start, end, settings=settings)
    lookback_start = end - spec.monitoring.performance.label_lookback_windows * (end - start)
    labelled = pd.DataFrame({name: pd.Series(dtype="object") for name in LABELLED_COLUMNS})
    earlier_rows = 0
    if len(labels):
        wanted = sorted(set(labels["request_id"].astype(str)))
        earlier = _collected_predictions(settings, spec.name, lookback_start, start, wanted)
        earlier_rows = len(earlier)
        candidates = pd.concat([earlier, current], ignore_index=True)
        candidates = candidates.drop_duplicates(["request_id", "entity_id"], keep="last")
        arrived = labels.rename(columns={"ts": "label_ts"})[
            ["request_id", "entity_id", "label", "label_ts"]].astype(
            {"request_id": str, "entity_id": str})
        labelled = candidates.merge(arrived, on=["request_id", "entity_id"], how="inner")
        labelled = labelled[list(LABELLED_COLUMNS)].sort_values("ts", kind="stable")
    labelled_path = directory / LABELLED_FILE
    _write_parquet(labelled.reset_index(drop=True), labelled_path)
    versions = current["model_version"].value_counts().sort_index()
    result = {
        "pipeline": spec.name, "window_id": window_id,
        "start": start.isoformat(), "end": end.isoformat(),
        "predictions_path": str(predictions_path), "labelled_path": str(labelled_path),
        "rows": len(current), "labels_received": len(labels), "labelled_rows": len(labelled),
        "labels_unmatched": len(labels) - len(labelled),
        "label_lookback_start": lookback_start.isoformat(),
        "earlier_predictions_matched": earlier_rows,
        "model_versions": {str(k): int(v) for k, v in versions.items()},
    }
    log.info("collect %s window %s: %d predictions (versions %s), %d labels arrived, %d matched "
             "to predictions since %s; written to %s", spec.name, window_id, len(current),
             result["model_versions"], len(labels), len(labelled), lookback_start, directory)
    return result
