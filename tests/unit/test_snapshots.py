"""Content-addressed raw snapshots, interval manifests, quarantine and the validated pointer."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airmlops.data.simulator import simulate_observations
from airmlops.data.snapshots import (
    SnapshotRef,
    canonicalize,
    frame_digest,
    latest_validated,
    mark_validated,
    quarantine_snapshot,
    read_snapshot,
    snapshot_for_interval,
    write_snapshot,
)
from airmlops.settings import PROJECT_ROOT
from airmlops.spec import SimulatorSource, load_spec

SPEC = load_spec(PROJECT_ROOT / "include/pipelines/churn.yaml")
SOURCE = SimulatorSource(kind="simulator", seed=7, customers=400)
UTC = dt.UTC


def interval(day: int) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(days=day)
    return start, start + dt.timedelta(days=1)


def batch(day: int, seed: int = 7) -> pd.DataFrame:
    start = dt.date(2026, 1, 1) + dt.timedelta(days=day)
    source = SOURCE.model_copy(update={"seed": seed})
    return canonicalize(simulate_observations(source, start, start + dt.timedelta(days=7)), SPEC)


def test_digest_depends_on_values_names_and_dtypes_not_the_index() -> None:
    frame = batch(0)
    digest = frame_digest(frame)
    assert len(digest) == 64
    assert frame_digest(frame.set_index(frame.index + 100)) == digest
    changed = frame.copy()
    changed.loc[3, "sessions"] += 1
    assert frame_digest(changed) != digest
    assert frame_digest(frame.rename(columns={"sessions": "visits"})) != digest
    assert frame_digest(frame.astype({"sessions": "float64"})) != digest
    assert frame_digest(frame.iloc[::-1]) != digest  # row order matters: canonicalize first
    assert frame_digest(canonicalize(frame.sample(frac=1.0, random_state=1), SPEC)) == digest
    assert frame_digest(batch(0, seed=8)) != digest


def test_digest_is_stable_across_processes() -> None:
    frame = pd.DataFrame({"customer_id": ["C1", "C2"], "x": [1.5, np.nan],
                          "ts": pd.to_datetime(["2026-01-01", "2026-01-02"], utc=True)})
    code = (
        "import pandas as pd, numpy as np\n"
        "from airmlops.data.snapshots import frame_digest\n"
        "f = pd.DataFrame({'customer_id': ['C1', 'C2'], 'x': [1.5, np.nan],\n"
        "                  'ts': pd.to_datetime(['2026-01-01', '2026-01-02'], utc=True)})\n"
        "print(frame_digest(f))\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.strip() == frame_digest(frame)


def test_canonicalize_sorts_by_timestamp_then_entity() -> None:
    frame = pd.DataFrame({
        "customer_id": ["C2", "C1", "C3"],
        "event_timestamp": pd.to_datetime(["2026-01-02", "2026-01-02", "2026-01-01"], utc=True),
    }, index=[7, 8, 9])
    canonical = canonicalize(frame, SPEC)
    assert canonical["customer_id"].tolist() == ["C3", "C1", "C2"]
    assert canonical.index.tolist() == [0, 1, 2]


def test_same_data_twice_is_one_immutable_file(tmp_path: Path) -> None:
    frame = batch(0)
    first = write_snapshot(frame, "churn", tmp_path, interval(0))
    assert first.created and first.rows == len(frame)
    assert first.path == tmp_path.resolve() / "snapshots" / "churn" / f"{first.digest}.parquet"
    stamp = first.path.stat().st_mtime_ns
    second = write_snapshot(batch(0), "churn", tmp_path, interval(0))
    assert not second.created
    assert second.digest == first.digest and second.path == first.path
    assert first.path.stat().st_mtime_ns == stamp  # not rewritten
    assert sorted(p.name for p in first.path.parent.glob("*.parquet")) == [first.path.name]
    assert not list(tmp_path.rglob("*.tmp"))

    manifest = first.path.parent / "intervals" / "20260101T000000Z_20260102T000000Z.json"
    assert json.loads(manifest.read_text())["digest"] == first.digest
    assert snapshot_for_interval("churn", tmp_path, interval(0)) == second
    assert snapshot_for_interval("churn", tmp_path, interval(1)) is None

    back = read_snapshot(first, verify=True)
    pd.testing.assert_frame_equal(back, frame)
    pd.testing.assert_frame_equal(read_snapshot(str(first.path)), frame)
    assert SnapshotRef.from_xcom(json.loads(json.dumps(first.to_xcom()))) == first


def test_different_data_gets_a_different_snapshot(tmp_path: Path) -> None:
    one = write_snapshot(batch(0), "churn", tmp_path, interval(0))
    two = write_snapshot(batch(7), "churn", tmp_path, interval(7))
    assert one.digest != two.digest and one.path.exists() and two.path.exists()


def test_a_tampered_snapshot_fails_verification(tmp_path: Path) -> None:
    ref = write_snapshot(batch(0), "churn", tmp_path, interval(0))
    other = batch(7)
    other.to_parquet(ref.path, index=False)
    with pytest.raises(ValueError, match="does not match its digest"):
        read_snapshot(ref, verify=True)


def test_names_and_intervals_are_validated(tmp_path: Path) -> None:
    frame = batch(0)
    with pytest.raises(ValueError, match="invalid pipeline name"):
        write_snapshot(frame, "../evil", tmp_path, interval(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        write_snapshot(frame, "churn", tmp_path, (dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2)))
    start, end = interval(0)
    with pytest.raises(ValueError, match="before its start"):
        write_snapshot(frame, "churn", tmp_path, (end, start))
    with pytest.raises(ValueError, match=r"SnapshotRef\.digest: expected 64 hex digits"):
        SnapshotRef.from_xcom({**write_snapshot(frame, "churn", tmp_path, interval(0)).to_xcom(),
                               "digest": "../../x"})


def test_quarantine_moves_the_batch_with_its_report_and_is_idempotent(tmp_path: Path) -> None:
    good = write_snapshot(batch(0), "churn", tmp_path, interval(0))
    mark_validated(good, tmp_path)
    bad = write_snapshot(batch(7, seed=9), "churn", tmp_path, interval(7))
    report = {"success": False, "failed": ["minutes_watched not null"],
              "null_share": np.float64(0.3), "at": dt.datetime(2026, 1, 9, tzinfo=UTC)}

    folder = quarantine_snapshot(bad, report, tmp_path, html="<h1>failed</h1>")
    assert folder == tmp_path.resolve() / "quarantine" / "churn" / bad.digest
    assert not bad.path.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "data.parquet"), batch(7, seed=9))
    saved = json.loads((folder / "report.json").read_text())
    assert saved["null_share"] == 0.3 and saved["failed"] == ["minutes_watched not null"]
    assert (folder / "report.html").read_text() == "<h1>failed</h1>"
    assert snapshot_for_interval("churn", tmp_path, interval(7)) is None
    assert snapshot_for_interval("churn", tmp_path, interval(0)) == good  # others untouched
    assert latest_validated("churn", tmp_path) == good

    again = quarantine_snapshot(bad, report, tmp_path)
    assert again == folder and (folder / "data.parquet").exists()
    # the same bad content ingested again is quarantined again, in the same place
    again_ref = write_snapshot(batch(7, seed=9), "churn", tmp_path, interval(7))
    assert again_ref.created and again_ref.digest == bad.digest
    assert quarantine_snapshot(again_ref, report, tmp_path) == folder
    assert not again_ref.path.exists()


def test_quarantine_of_an_unknown_snapshot_fails(tmp_path: Path) -> None:
    ref = write_snapshot(batch(0), "churn", tmp_path, interval(0))
    ref.path.unlink()
    with pytest.raises(FileNotFoundError):
        quarantine_snapshot(ref, {"success": False}, tmp_path)


def test_validated_pointer_moves_forward_only(tmp_path: Path) -> None:
    assert latest_validated("churn", tmp_path) is None
    early = write_snapshot(batch(0), "churn", tmp_path, interval(0))
    late = write_snapshot(batch(7), "churn", tmp_path, interval(7))
    assert mark_validated(late, tmp_path)
    assert not mark_validated(early, tmp_path)  # a backfill does not move it back
    current = latest_validated("churn", tmp_path)
    assert current is not None and current.digest == late.digest and not current.created
    pd.testing.assert_frame_equal(read_snapshot(current, verify=True), batch(7))
    # quarantining the validated snapshot withdraws it as reference data
    quarantine_snapshot(late, {"success": False}, tmp_path)
    assert latest_validated("churn", tmp_path) is None
    assert mark_validated(early, tmp_path)
    assert latest_validated("churn", tmp_path) == early
