"""The `airmlops` command line: `airmlops platform up|down|status` and its old spelling,
`python -m airmlops.platform`, which must keep working with the same options and answers.

Every command here runs as its own process, as a user (or `make`) runs it, against a fresh
run dir in which nothing was ever started; nothing touches a running `make run` platform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AIRMLOPS = [str(Path(sys.executable).parent / "airmlops")]
"""The console script `pip install -e .` puts next to the interpreter."""
AS_MODULE = [sys.executable, "-m", "airmlops.platform"]
PLATFORM = [*AIRMLOPS, "platform"]
COMPONENTS = {"postgres", "mlflow", "api-server", "scheduler", "dag-processor", "triggerer",
              "log-server", "watchdog"}


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env=env or dict(os.environ))


@pytest.fixture
def fresh_run_dir(tmp_path: Path) -> Path:
    """A run dir no platform ever used (not even created)."""
    return tmp_path / "state"


def test_the_console_script_is_installed() -> None:
    assert Path(AIRMLOPS[0]).is_file(), "run `make setup` (pip install -e .) first"


def test_platform_help_lists_up_down_status() -> None:
    result = _run([*PLATFORM, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: airmlops platform" in result.stdout
    for command in ("up", "down", "status"):
        assert command in result.stdout


def test_top_level_help_names_the_platform_command() -> None:
    result = _run([*AIRMLOPS, "--help"])
    assert result.returncode == 0, result.stderr
    assert "platform" in result.stdout and "replay" in result.stdout


def test_python_dash_m_airmlops_platform_still_works() -> None:
    result = _run([*AS_MODULE, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: python -m airmlops.platform" in result.stdout


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_both_spellings_take_the_same_options(command: str) -> None:
    new = _run([*PLATFORM, command, "--help"])
    old = _run([*AS_MODULE, command, "--help"])
    assert new.returncode == old.returncode == 0, new.stderr + old.stderr
    options = [line.split()[0] for line in new.stdout.splitlines() if line.startswith("  -")]
    assert options, new.stdout
    assert new.stdout.split("options:")[1] == old.stdout.split("options:")[1]


def test_status_of_a_fresh_run_dir_says_not_running(fresh_run_dir: Path) -> None:
    result = _run([*PLATFORM, "status", "--run-dir", str(fresh_run_dir)])
    assert result.returncode == 0, result.stderr
    assert f"run dir {fresh_run_dir}" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) == COMPONENTS
    assert all(line.endswith("not running") for line in lines.values()), result.stdout
    assert not fresh_run_dir.exists(), "status must not create the run dir"


def test_status_answers_as_python_dash_m_did(fresh_run_dir: Path) -> None:
    env = {**os.environ, "MLOPS_RUN_DIR": str(fresh_run_dir)}  # the run dir from the environment
    new = _run([*PLATFORM, "status", "--json"], env=env)
    old = _run([*AS_MODULE, "status", "--json"], env=env)
    assert (new.returncode, new.stdout) == (old.returncode, old.stdout)
    report = json.loads(new.stdout)
    assert report["run_dir"] == str(fresh_run_dir)
    assert set(report["components"]) == COMPONENTS
    assert not any(c["alive"] for c in report["components"].values())
    assert report["airflow_url"] is None and report["airflow_health"] is None


def test_down_on_a_fresh_run_dir_stops_nothing(fresh_run_dir: Path) -> None:
    # conftest points MLOPS_DATA_ROOT at a session directory: no real deployment is stopped.
    result = _run([*PLATFORM, "down", "--run-dir", str(fresh_run_dir)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"nothing was running in {fresh_run_dir}" in result.stdout


def test_a_bad_option_is_refused_with_usage() -> None:
    result = _run([*PLATFORM, "up", "--airflow-port", "0",
                   "--run-dir", "/nonexistent/never"])
    assert result.returncode == 1
    assert "[platform] error: invalid port 0" in result.stderr
    unknown = _run([*PLATFORM, "sideways"])
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
