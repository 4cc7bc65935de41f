"""Immutable, content-addressed raw snapshots, their quarantine and the validated reference.

Layout under the data root (passed in as ``root``)::

    snapshots/<pipeline>/<digest>.parquet              one file per distinct batch content
    snapshots/<pipeline>/intervals/<start>_<end>.json  which digest a data interval produced
    snapshots/<pipeline>/validated.json                the latest batch that passed validation
    quarantine/<pipeline>/<digest>/data.parquet        a batch that failed validation,
                                   report.json         with its validation report
                                   report.html         (and the human-readable one, if any)

The digest of a batch is its data version: the same interval ingested twice gives the same
digest and one file. Snapshot files are written once and never modified.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from airmlops.contracts import SnapshotRef
from airmlops.names import NAME_PATTERN, is_name
from airmlops.paths import atomic_write_bytes, atomic_write_json, atomic_write_text, safe_join
from airmlops.spec import PipelineSpec
from airmlops.times import utc

__all__ = ["SnapshotRef", "canonicalize", "frame_digest", "latest_validated", "mark_validated",
           "quarantine_snapshot", "read_snapshot", "snapshot_for_interval", "write_snapshot"]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def canonicalize(df: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """Rows sorted by (timestamp, entity key) with a fresh index: the form that gets digested."""
    ordered = df.sort_values([spec.timestamp, spec.entity_key], kind="mergesort")
    return ordered.reset_index(drop=True)


def frame_digest(df: pd.DataFrame) -> str:
    """SHA-256 of a frame's column names, dtypes and row values (not its index).

    Stable across runs and processes (pandas' row hash uses a fixed key). Row order matters:
    pass a canonical frame (:func:`canonicalize`).
    """
    digest = hashlib.sha256()
    header = [[str(name), str(dtype)] for name, dtype in df.dtypes.items()]
    digest.update(json.dumps(header).encode("utf-8"))
    digest.update(b"\x00")
    if len(df.columns):
        row_hashes = pd.util.hash_pandas_object(df, index=False).to_numpy()
        digest.update(row_hashes.astype("<u8").tobytes())
    return digest.hexdigest()


def write_snapshot(df: pd.DataFrame, pipeline: str, root: Path,
                   interval: tuple[dt.datetime, dt.datetime]) -> SnapshotRef:
    """Store ``df`` as ``snapshots/<pipeline>/<digest>.parquet`` unless it exists; record the
    interval's manifest. ``created`` is False when the same content was already there."""
    _check_pipeline(pipeline)
    start, end = _check_interval(interval)
    digest = frame_digest(df)
    path = _snapshot_path(root, pipeline, digest)
    created = not path.exists()
    if created:
        buffer = io.BytesIO()
        df.to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue())
    ref = SnapshotRef(pipeline=pipeline, digest=digest, path=path, rows=len(df),
                      interval_start=start, interval_end=end, created=created)
    atomic_write_json(_manifest_path(root, pipeline, start, end), _pointer(ref))
    return ref


def snapshot_for_interval(pipeline: str, root: Path,
                          interval: tuple[dt.datetime, dt.datetime]) -> SnapshotRef | None:
    """The snapshot an interval produced, or None if it has none (or it was quarantined)."""
    _check_pipeline(pipeline)
    start, end = _check_interval(interval)
    return _read_pointer(_manifest_path(root, pipeline, start, end), root)


def read_snapshot(ref_or_path: SnapshotRef | Path | str, *, verify: bool = False) -> pd.DataFrame:
    """Load a snapshot; with ``verify`` (a ref only), check its content still has its digest."""
    if isinstance(ref_or_path, SnapshotRef):
        frame = pd.read_parquet(ref_or_path.path)
        if verify and frame_digest(frame) != ref_or_path.digest:
            raise ValueError(f"snapshot {ref_or_path.path} does not match its digest "
                             f"{ref_or_path.digest}")
        return frame
    if verify:
        raise ValueError("verify needs a SnapshotRef (a bare path carries no digest)")
    return pd.read_parquet(Path(ref_or_path))


def quarantine_snapshot(ref: SnapshotRef, report: dict[str, Any], root: Path,
                        html: str | None = None) -> Path:
    """Move a failed batch to ``quarantine/<pipeline>/<digest>/`` with its report; return that
    folder. The snapshot file, its interval manifest and any validated pointer to it go away.
    Quarantining twice is harmless."""
    _check_pipeline(ref.pipeline)
    _check_digest(ref.digest)
    folder = safe_join(Path(root), "quarantine", ref.pipeline, ref.digest)
    atomic_write_text(folder / "report.json",
                      json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n")
    if html is not None:
        atomic_write_text(folder / "report.html", html)
    atomic_write_json(folder / "snapshot.json", _pointer(ref))
    source = _snapshot_path(root, ref.pipeline, ref.digest)
    target = folder / "data.parquet"
    if source.exists():
        os.replace(source, target)  # same data root, so an atomic rename
    elif not target.exists():
        raise FileNotFoundError(f"snapshot {source} is neither in snapshots nor in quarantine")
    manifest = _manifest_path(root, ref.pipeline, ref.interval_start, ref.interval_end)
    _remove_pointer_if(manifest, ref.digest)
    _remove_pointer_if(_validated_path(root, ref.pipeline), ref.digest)
    return folder


def mark_validated(ref: SnapshotRef, root: Path) -> bool:
    """Make ``ref`` the pipeline's validated reference unless a later interval already is.

    Monotone in the interval end, so backfills and retries in any order agree. Returns whether
    the pointer now names ``ref``.
    """
    _check_pipeline(ref.pipeline)
    pointer = _validated_path(root, ref.pipeline)
    current = _read_pointer(pointer, root, require_file=False)
    if current is not None and current.interval_end > ref.interval_end:
        return False
    atomic_write_json(pointer, _pointer(ref))
    return True


def latest_validated(pipeline: str, root: Path) -> SnapshotRef | None:
    """The pipeline's latest validated snapshot (reference data), or None."""
    _check_pipeline(pipeline)
    return _read_pointer(_validated_path(root, pipeline), root)


# --- helpers ---------------------------------------------------------------------------------


def _check_pipeline(pipeline: str) -> str:
    if not is_name(pipeline):
        raise ValueError(f"invalid pipeline name {pipeline!r} (expected {NAME_PATTERN})")
    return pipeline


def _check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid snapshot digest {digest!r} (expected 64 hex digits)")
    return digest


def _check_interval(interval: tuple[dt.datetime, dt.datetime]) -> tuple[dt.datetime, dt.datetime]:
    start, end = (utc(pd.Timestamp(bound).to_pydatetime(), "interval bound")
                  for bound in interval)
    if end < start:
        raise ValueError(f"interval end {end.isoformat()} is before its start {start.isoformat()}")
    return start, end


def _stamp(value: dt.datetime) -> str:
    text = value.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{text}.{value.microsecond:06d}Z" if value.microsecond else f"{text}Z"


def _snapshot_path(root: Path, pipeline: str, digest: str) -> Path:
    return safe_join(Path(root), "snapshots", pipeline, f"{_check_digest(digest)}.parquet")


def _manifest_path(root: Path, pipeline: str, start: dt.datetime, end: dt.datetime) -> Path:
    name = f"{_stamp(start)}_{_stamp(end)}.json"
    return safe_join(Path(root), "snapshots", pipeline, "intervals", name)


def _validated_path(root: Path, pipeline: str) -> Path:
    return safe_join(Path(root), "snapshots", pipeline, "validated.json")


def _pointer(ref: SnapshotRef) -> dict[str, Any]:
    """What manifests and pointers store: no absolute path, so the data root can move."""
    return {
        "pipeline": ref.pipeline,
        "digest": ref.digest,
        "rows": ref.rows,
        "interval_start": ref.interval_start.isoformat(),
        "interval_end": ref.interval_end.isoformat(),
    }


def _read_pointer(path: Path, root: Path, require_file: bool = True) -> SnapshotRef | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    snapshot = _snapshot_path(root, _check_pipeline(data["pipeline"]), data["digest"])
    if require_file and not snapshot.exists():
        return None
    return SnapshotRef.from_xcom({**data, "path": str(snapshot), "created": False})


def _remove_pointer_if(path: Path, digest: str) -> None:
    """Delete a manifest/pointer file only if it still names ``digest``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    if data.get("digest") == digest:
        path.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    """Numbers and times that reports commonly hold (numpy scalars, timestamps, paths)."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
