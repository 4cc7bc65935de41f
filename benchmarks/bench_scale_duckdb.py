"""Scale curve of the DuckDB point-in-time engine, beside the memory engine's.

``get_historical_features_duckdb`` (``feature_store.offline_engine: duckdb``) on the shared
offline data (``common.feature_data_root``: 3 views x 3M stored rows, 14 + 2 on-demand
features) for 1M and 10M entity rows (``bench_pit.entity_frame``, prepared by
``bench_scale_offline``'s own worker), each run in a fresh child process with a fixed DuckDB
``memory_limit``: the call's wall time, the process's own peak resident set ``VmHWM``, whether
DuckDB spilled to its temporary folder and, at the smallest size, whether the result equals the
memory engine's row by row. The memory engine's figures are read from
``results/scale_offline.json`` (not re-measured).

Run: ``.venv/bin/python benchmarks/bench_scale_duckdb.py`` (``--runs 1000000:1024,...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale_offline
import common

RUNS = ((1_000_000, 1024), (10_000_000, 1024), (10_000_000, 256))
"""(entity rows, DuckDB memory_limit in MB) per run."""
CHECK_MAX_ROWS = 1_000_000
"""Runs up to this size also compare the result with the memory engine's (after the peak)."""
NAME = "scale_duckdb"


class _SpillLog(logging.Handler):
    """Keeps the engine's log line about its temporary folder (files there = it spilled)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.files: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "temporary folder" in record.msg:
            self.files = int(record.args[2])


def worker_duckdb(rows: int, memory_limit_mb: int) -> dict[str, Any]:
    """Time the DuckDB engine on the entity frame; check rows (and, when small, values)."""
    import numpy as np
    import pandas as pd

    from airmlops.features.offline_duckdb import get_historical_features_duckdb

    spill = _SpillLog()
    logger = logging.getLogger("airmlops.features.offline_duckdb")
    logger.setLevel(logging.INFO)
    logger.addHandler(spill)
    fs = common.feature_set()
    root = common.feature_data_root()
    entity_df = pd.read_parquet(bench_scale_offline.entity_path(rows))
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    frame = get_historical_features_duckdb(entity_df, fs.views, root, common.PIPELINE,
                                           on_demand=fs.on_demand,
                                           memory_limit_mb=memory_limit_mb)
    seconds = time.perf_counter() - began
    peak = common.memory_status_mb()
    same_rows = bool(len(frame) == len(entity_df) and np.array_equal(
        frame["row_id"].to_numpy(), entity_df["row_id"].to_numpy()))
    answer = {"seconds": seconds, "rows_in": len(entity_df), "rows_out": len(frame),
              "same_rows_in_order": same_rows, "memory_limit_mb": memory_limit_mb,
              "temp_files": spill.files, "baseline_rss_mb": baseline, "call_peak_mb": peak,
              "equal_to_memory_engine": None}
    if rows <= CHECK_MAX_ROWS:
        from airmlops.features.offline import get_historical_features

        expected = get_historical_features(entity_df, fs.views, root, common.PIPELINE,
                                           on_demand=fs.on_demand)
        answer["equal_to_memory_engine"] = bool(expected.equals(frame))
    return answer


def run_child(kind: str, *args: str, timeout: float) -> dict[str, Any]:
    """A worker of this script in a fresh process; a failure or timeout is an answer too."""
    done = common.run_measured([common.PYTHON, __file__, "--worker", kind, *args],
                               timeout=timeout)
    figures = {k: done[k] for k in ("wall_s", "peak_rss_mb", "cpu_s")}
    if done["timed_out"]:
        return {"failed": f"stopped after {timeout:.0f} s", "_process": figures}
    if done["returncode"] != 0:
        return {"failed": (done["stderr"].strip().splitlines() or ["?"])[-1],
                "_process": figures}
    answer = common.last_json_line(done["stdout"])
    answer["_process"] = common.process_figures(done, answer)
    return answer


def measure(runs: list[tuple[int, int]], timeout: float) -> list[dict[str, Any]]:
    """One child per (rows, memory limit), the entity frames prepared by the offline bench."""
    results = []
    for rows, limit in runs:
        bench_scale_offline.run_child("prepare", "pit", str(rows), timeout=timeout)
        answer = run_child("duckdb", str(rows), str(limit), timeout=timeout)
        results.append({"rows": rows, **answer})
        common.log(f"duckdb {rows:,} at {limit} MB: {bench_scale_offline.describe(answer)}")
    return results


def memory_engine_runs() -> tuple[list[dict[str, Any]], str | None]:
    """The memory engine's pit curve from ``results/scale_offline.json`` and its date."""
    path = common.RESULTS_DIR / "scale_offline.json"
    if not path.exists():
        return [], None
    saved = json.loads(path.read_text())
    return saved["results"]["curves"].get("pit", []), saved["measured_at"]


def table_rows(duckdb_runs: list[dict], memory_runs: list[dict]) -> list[list[Any]]:
    """One row per run: engine, rows, memory limit, seconds, peaks, spill, checks."""
    table = []
    for r in memory_runs:
        if "failed" not in r:
            table.append(["memory", r["rows"], None, r["seconds"], r["_process"]["peak_rss_mb"],
                          r["_process"]["peak_rss_mb"] - r["baseline_rss_mb"], None,
                          r.get("rows_out") == r["rows"], None])
    for r in duckdb_runs:
        if "failed" in r:
            table.append(["duckdb", r["rows"], None, f"failed: {r['failed']}",
                          r["_process"]["peak_rss_mb"], None, None, None, None])
            continue
        peak = r["call_peak_mb"]
        table.append(["duckdb", r["rows"], r["memory_limit_mb"], r["seconds"], peak,
                      peak - r["baseline_rss_mb"], "yes" if r["temp_files"] else "no",
                      r["rows_out"] == r["rows"] and r["same_rows_in_order"],
                      r["equal_to_memory_engine"]])
    return table


def plot(duckdb_runs: list[dict], memory_runs: list[dict], path: Path) -> None:
    """Time and peak memory against rows, log-log, one line per engine and memory limit."""
    runs: dict[str, list[dict]] = {"memory engine": [r for r in memory_runs
                                                     if "failed" not in r]}
    for r in duckdb_runs:
        if "failed" not in r:
            runs.setdefault(f"duckdb, memory_limit {r['memory_limit_mb']} MB", []).append(r)
    series = {label: ([r["rows"] for r in done], [r["seconds"] for r in done],
                      [r.get("call_peak_mb") or r["_process"]["peak_rss_mb"] for r in done])
              for label, done in runs.items()}
    common.time_and_memory_figure(path, "Point-in-time join: memory engine vs DuckDB engine",
                                  "entity rows", series)


def report(duckdb_runs: list[dict], notes: list[str]) -> None:
    """Print the table, write ``results/scale_duckdb.{md,json,png}``."""
    memory_runs, memory_at = memory_engine_runs()
    headers = ["engine", "rows", "memory_limit MB", "seconds", "peak RSS MB",
               "peak - baseline MB", "spilled", "all rows in order", "equal to memory engine"]
    load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    notes = [*notes,
             f"memory engine: the pit curve of results/scale_offline.json (measured "
             f"{memory_at}), not re-run here." if memory_at else
             "memory engine: results/scale_offline.json not found.",
             "duckdb: time = get_historical_features_duckdb on the loaded entity frame (3 views "
             "x 3M stored rows, 14 + 2 on-demand features); peak = the worker's VmHWM right "
             "after the call (imports, entity frame, result); spilled = DuckDB opened its "
             "temporary folder under the data root.",
             f"equal to memory engine: checked with DataFrame.equals at up to "
             f"{CHECK_MAX_ROWS:,} rows, after the peak was read.",
             f"load average when written: {load} (1/5/15 min; 2 cores shared with other "
             "sessions: one run per size, not a median; memory figures are reliable)."]
    results = {"duckdb": duckdb_runs, "memory": memory_runs, "memory_measured_at": memory_at}
    common.write_results(NAME, "Point-in-time join: the DuckDB engine beside the memory engine",
                         results, [("", headers, table_rows(duckdb_runs, memory_runs))], notes)
    plot(duckdb_runs, memory_runs, common.RESULTS_DIR / f"{NAME}.png")


def main() -> int:
    """Measure the runs (or run one worker) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", help="comma-separated rows:memory_limit_mb pairs")
    parser.add_argument("--timeout", type=float, default=900.0, help="per child, seconds")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _, rows, limit = args.worker
        answer = worker_duckdb(int(rows), int(limit))
        answer["vmhwm_mb"] = common.memory_status_mb()
        print(json.dumps(answer, default=str), flush=True)
        return 0
    runs = [tuple(int(x) for x in pair.split(":")) for pair in args.runs.split(",")] \
        if args.runs else list(RUNS)
    common.feature_data_root()
    report(measure(runs, args.timeout), [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
