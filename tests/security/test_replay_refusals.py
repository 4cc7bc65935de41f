"""``airmlops replay --file`` reads a file a user hands it: it refuses what is not a regular
CSV or Parquet file of rows (another suffix, a folder, a FIFO, a missing or dangling path, an
empty file), a file missing a spec column (named), and simulator options or a dry run that do
not apply; links are followed to a regular file."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from toy_specs import LOANS_SPEC

from airmlops.cli import main
from airmlops.monitoring.file_replay import read_replay_file
from airmlops.monitoring.replay import ReplayError
from airmlops.spec import PipelineSpec, parse_spec

SPEC = LOANS_SPEC
START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


@pytest.fixture
def spec(tmp_path: Path) -> PipelineSpec:
    """The loans spec, its data root the test's folder."""
    return parse_spec(SPEC, data_roots=[tmp_path])


def history(count: int) -> pd.DataFrame:
    """``count`` good rows of the loans spec, a minute apart."""
    return pd.DataFrame({
        "loan_id": [f"L{i:04d}" for i in range(count)],
        "event_time": [(START + dt.timedelta(minutes=i)).isoformat() for i in range(count)],
        "amount": [1000 + i for i in range(count)],
        "grade": [("A", "B", "C")[i % 3] for i in range(count)],
        "income": [2500.5 + i for i in range(count)],
        "defaulted": [i % 2 for i in range(count)],
    })


def write_csv(root: Path, frame: pd.DataFrame, name: str = "history.csv") -> Path:
    """``frame`` as ``root/history/name``."""
    path = root / "history" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def spec_file(tmp_path: Path) -> Path:
    """The loans spec as a YAML file, as a user passes it to ``--spec``."""
    path = tmp_path / "loans.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


# --- the file itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["history.json", "history", "history.csv.gz"])
def test_other_suffixes_are_refused(tmp_path, spec, name):
    path = tmp_path / name
    path.write_text("loan_id\n")
    with pytest.raises(ReplayError, match=r"expected a \.csv, \.parquet or \.pq file"):
        read_replay_file(spec, path)


def test_only_regular_files_are_read_and_links_are_followed(tmp_path, spec):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(ReplayError, match="is not a regular file"):
        read_replay_file(spec, folder)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(ReplayError, match="is not a regular file"):
        read_replay_file(spec, fifo)  # refused without blocking on a writer
    with pytest.raises(ReplayError, match="cannot be read"):
        read_replay_file(spec, tmp_path / "absent.csv")
    target = write_csv(tmp_path, history(5))
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert len(read_replay_file(spec, link)) == 5
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "gone.csv")
    with pytest.raises(ReplayError, match="cannot be read"):
        read_replay_file(spec, dangling)


def test_an_empty_file_is_refused(tmp_path, spec):
    path = write_csv(tmp_path, history(3).iloc[:0])
    with pytest.raises(ReplayError, match="has no rows"):
        read_replay_file(spec, path)


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "named"), [
    (["--scenario", "stable"], "--scenario"), (["--day", "2026-01-01"], "--day"),
    (["--days", "3"], "--days"), (["--refresh-features"], "--refresh-features"),
])
def test_the_cli_refuses_simulator_options_with_a_file(tmp_path, capsys, extra, named):
    path = write_csv(tmp_path, history(3))
    spec_path = spec_file(tmp_path)
    assert main(["replay", "--spec", str(spec_path), "--file", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{named} only apply to simulator replays" in err


def test_the_cli_refuses_a_dry_run_without_a_file(capsys):
    assert main(["replay", "--dry-run"]) == 2
    assert "--dry-run only applies to a --file replay" in capsys.readouterr().err


def test_the_cli_names_a_missing_column(tmp_path, capsys):
    path = write_csv(tmp_path, history(3).drop(columns="event_time"))
    spec_path = spec_file(tmp_path)
    assert main(["replay", "--spec", str(spec_path), "--file", str(path)]) == 2
    assert "'event_time' (timestamp)" in capsys.readouterr().err
