"""Time-based train/test split with an embargo, and training sets written as Parquet.

A random split leaks the future into training when rows are observations over time. Here the
test set is the most recent ``test_fraction`` of labelled rows, and training stops
``gap_days`` before the test period starts: a label looks ``gap_days`` ahead (the label
horizon), so no training label can describe a day that is also in the test period.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.paths import atomic_write_bytes, safe_join

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.spec import PipelineSpec

MIN_TEST_ROWS = 50
"""Fewest held-out rows a metric (and a bootstrap interval) is computed on."""

EMBARGOED_FILE = "embargoed.parquet"
"""The embargoed rows of a training set, beside ``train.parquet`` (see :func:`time_partition`)."""

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """Where a training set was cut and how many rows went where; JSON-serialisable.

    Timestamps are ISO 8601 strings. ``train_end`` is exclusive: every training row is earlier.
    """

    cutoff: str
    train_end: str
    train_start: str
    test_end: str
    train_rows: int
    test_rows: int
    embargoed_rows: int
    unlabeled_rows: int
    test_fraction: float
    gap_days: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitInfo:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


def time_split(
    df: pd.DataFrame, spec: PipelineSpec
) -> tuple[pd.DataFrame, pd.DataFrame, SplitInfo]:
    """Split ``df`` by time into (train, test, info); raise ``ValueError`` if either is unusable.

    Rows without a label or a timestamp are dropped first (their labels have not arrived, or
    they cannot be placed in time). The cutoff is the timestamp quantile at
    ``1 - test_fraction``: test is every row at or after it, train every row earlier than
    ``cutoff - gap_days``. Rows in between are embargoed and used by neither (see
    :func:`time_partition` for them).
    """
    train, _, test, info = time_partition(df, spec)
    return train, test, info


def time_partition(
    df: pd.DataFrame, spec: PipelineSpec
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, SplitInfo]:
    """:func:`time_split` with the embargoed rows too: (train, embargoed, test, info).

    The three parts, concatenated in that order, are every labelled row of ``df`` in time
    order: what a refit on the whole batch trains on (see :func:`read_labelled_set`).
    """
    import numpy as np
    import pandas as pd

    missing = [c for c in (spec.timestamp, spec.label) if c not in df.columns]
    if missing:
        raise ValueError(f"training data has no column(s) {missing}")

    timestamps = pd.to_datetime(df[spec.timestamp])
    usable = timestamps.notna() & df[spec.label].notna()
    unlabeled_rows = int((~usable).sum())
    frame = df.loc[usable].assign(**{spec.timestamp: timestamps[usable]})
    sort_by = [spec.timestamp]
    if spec.entity_key in frame.columns:
        sort_by.append(spec.entity_key)  # a stable order for equal timestamps
    frame = frame.sort_values(sort_by, kind="mergesort").reset_index(drop=True)
    if frame.empty:
        raise ValueError("training data has no row with both a timestamp and a label")

    ordered = frame[spec.timestamp]
    position = int(np.floor((1.0 - spec.training.test_fraction) * (len(ordered) - 1)))
    cutoff = ordered.iloc[position]
    train_end = cutoff - pd.Timedelta(days=spec.training.gap_days)

    test = frame.loc[ordered >= cutoff].reset_index(drop=True)
    train = frame.loc[ordered < train_end].reset_index(drop=True)
    embargoed = frame.loc[(ordered >= train_end) & (ordered < cutoff)].reset_index(drop=True)
    embargoed_rows = len(embargoed)

    where = (
        f"(cutoff {cutoff.isoformat()}, training before {train_end.isoformat()}, "
        f"gap_days={spec.training.gap_days})"
    )
    if len(train) < spec.training.min_rows:
        raise ValueError(
            f"the training set has {len(train)} rows, fewer than training.min_rows="
            f"{spec.training.min_rows} {where}; pull a longer window or lower min_rows"
        )
    if len(test) < MIN_TEST_ROWS:
        raise ValueError(
            f"the test set has {len(test)} rows, fewer than {MIN_TEST_ROWS} {where}"
        )
    if spec.task == "binary_classification":
        for part, rows in (("training", train), ("test", test)):
            classes = rows[spec.label].unique()
            if len(classes) < 2:
                raise ValueError(
                    f"the {part} set has a single label class {classes.tolist()} {where}; "
                    "a classifier cannot be trained or evaluated on it"
                )

    info = SplitInfo(
        cutoff=cutoff.isoformat(),
        train_end=train_end.isoformat(),
        train_start=train[spec.timestamp].iloc[0].isoformat(),
        test_end=test[spec.timestamp].iloc[-1].isoformat(),
        train_rows=len(train),
        test_rows=len(test),
        embargoed_rows=embargoed_rows,
        unlabeled_rows=unlabeled_rows,
        test_fraction=spec.training.test_fraction,
        gap_days=spec.training.gap_days,
    )
    return train, embargoed, test, info


def write_training_set(
    train: pd.DataFrame,
    test: pd.DataFrame,
    root: Path,
    key: str,
    split: SplitInfo | None = None,
    embargoed: pd.DataFrame | None = None,
) -> dict[str, str]:
    """Write ``root/<key>/{train,test}.parquet`` (and ``split.json`` if given); return the paths.

    ``embargoed`` (the rows between train and test, see :func:`time_partition`) goes to
    ``embargoed.parquet`` when given, so that a refit can read every labelled row of the batch.

    ``key`` is one or more ``/``-separated segments of letters, digits and ``_.=-`` (for
    example a data digest); anything else is refused. Each file is written to a temporary name
    and renamed into place, and a file whose bytes would not change is left untouched, so a
    retry or a re-run never leaves a half-written or different file behind.
    """
    directory = _confined(Path(root), key)
    paths = {"train": directory / "train.parquet", "test": directory / "test.parquet"}
    for part, frame in (("train", train), ("test", test)):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        _write_if_changed(paths[part], buffer.getvalue())
    embargoed_path = directory / EMBARGOED_FILE
    if embargoed is not None:
        paths["embargoed"] = embargoed_path
        buffer = io.BytesIO()
        embargoed.to_parquet(buffer, index=False)
        _write_if_changed(embargoed_path, buffer.getvalue())
    else:
        embargoed_path.unlink(missing_ok=True)  # rows of another split must not be read back
    split_path = directory / "split.json"
    if split is not None:
        paths["split"] = split_path
        text = json.dumps(split.to_dict(), indent=2, sort_keys=True) + "\n"
        _write_if_changed(split_path, text.encode("utf-8"))
    else:
        split_path.unlink(missing_ok=True)  # never leave a description of other data beside
    return {part: str(path) for part, path in paths.items()}


def read_labelled_set(train_path: Path | str) -> pd.DataFrame:
    """Every labelled row of a training set's batch, in time order: train, embargoed, test.

    ``train_path`` is the set's ``train.parquet``; the embargoed and test rows are read from
    beside it. ``ValueError`` when the set cannot give every row its split counted (no
    ``split.json``, or embargoed rows counted but not written: a set written before refits
    existed), so a refit never silently trains on fewer rows than the batch had.
    """
    import pandas as pd

    train_path = Path(train_path)
    split = read_split_info(train_path)
    if split is None:
        raise ValueError(f"{train_path.parent} has no split.json: the rows of its batch cannot "
                         "be counted; run preprocess again")
    parts = [pd.read_parquet(train_path)]
    embargoed_path = train_path.with_name(EMBARGOED_FILE)
    if embargoed_path.is_file():
        parts.append(pd.read_parquet(embargoed_path))
    elif split.embargoed_rows:
        raise ValueError(f"{train_path.parent} counts {split.embargoed_rows} embargoed rows but "
                         f"has no {EMBARGOED_FILE} (written before refits existed); run "
                         "preprocess again")
    parts.append(pd.read_parquet(train_path.with_name("test.parquet")))
    rows = pd.concat(parts, ignore_index=True)
    expected = split.train_rows + split.embargoed_rows + split.test_rows
    if len(rows) != expected:
        raise ValueError(f"{train_path.parent} holds {len(rows)} labelled rows but its split "
                         f"counts {expected}: the files are not one split; run preprocess again")
    return rows


def read_split_info(train_path: Path | str) -> SplitInfo | None:
    """The ``split.json`` written beside a training set, or None when there is none."""
    path = Path(train_path).with_name("split.json")
    if not path.is_file():
        return None
    return SplitInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _confined(root: Path, key: str) -> Path:
    segments = key.split("/")
    if not key or not all(_KEY_SEGMENT.match(s) and s not in (".", "..") for s in segments):
        raise ValueError(
            f"training set key {key!r} is not valid: use '/'-separated segments of letters, "
            "digits and '_.=-'"
        )
    return safe_join(root, *segments)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)
