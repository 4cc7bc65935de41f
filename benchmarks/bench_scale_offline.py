"""Scale curves: the point-in-time training set and a monitoring window, 1M to 10M rows.

Curves instead of the points of benchmarks 3 and 4, each size in a fresh child process (the
call's wall time, the process's own peak resident set ``VmHWM``):

- pit: ``get_historical_features`` on the shared offline data (``common.feature_data_root``)
  for 1M, 3M, 10M entity rows (``bench_pit.entity_frame``), every row kept in order; Feast's
  DuckDB store at the smallest and largest size if ``benchmarks/.venv-feast`` already exists.
- monitoring: what ``bench_monitoring.worker_ours`` measures, i.e. read a collected window's
  Parquet and ``compute_window_report`` (with HTML) against one 1M-row reference profile.
- collect: the window read from a SQLite prediction log and flattened, as ``collect_window``.

Run: ``.venv/bin/python benchmarks/bench_scale_offline.py`` (``--quick``, ``--curves``, sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_monitoring
import bench_pit
import common

PIT_SIZES = (1_000_000, 3_000_000, 10_000_000)
MONITORING_SIZES = (1_000_000, 3_000_000, 10_000_000)
COLLECT_SIZES = (100_000, 1_000_000)
CURVES = ("pit", "feast", "profile", "monitoring", "collect")
QUICK_SIZES = (100_000, 300_000)
REFERENCE_ROWS = 1_000_000
"""The reference profile every window is compared with (the champion's, whatever the window)."""
BIG_PIT_ROWS = 30_000_000
"""Tried only when the largest size took under ``BIG_PIT_MAX_S`` and memory allows."""
BIG_PIT_MAX_S = 60.0
SCENARIO = "covariate_drift"
GOALS = {"pit": (10_000_000, 30.0, 2048.0), "monitoring": (10_000_000, 15.0, 1536.0)}
"""Per curve: (rows, at most seconds, at most peak MB) from issue 18."""


def work_dir() -> Path:
    """The scratch folder of this benchmark (created)."""
    path = common.WORK_DIR / "scale"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- workers (each in its own process) -------------------------------------------------------


def worker_pit(entity_path: str, profile: bool) -> dict[str, Any]:
    """Time ``get_historical_features`` on the entity frame; check every row comes back."""
    import numpy as np
    import pandas as pd

    from airmlops.features.offline import get_historical_features

    fs = common.feature_set()
    root = common.feature_data_root()
    entity_df = pd.read_parquet(entity_path)
    baseline = common.memory_status_mb()

    def call() -> Any:
        return get_historical_features(entity_df, fs.views, root, common.PIPELINE,
                                       on_demand=fs.on_demand)

    began, cpu_began = time.perf_counter(), time.process_time()
    frame, top = profiled(call) if profile else (call(), None)
    seconds, cpu_s = time.perf_counter() - began, time.process_time() - cpu_began
    peak = common.memory_status_mb()
    same_rows = bool(len(frame) == len(entity_df) and np.array_equal(
        frame["row_id"].to_numpy(), entity_df["row_id"].to_numpy()))
    # column by column: a frame[names] selection would copy every feature column first
    missing = sum(int(frame[n].isna().sum()) for n in fs.feature_names) / max(
        1, len(frame) * len(fs.feature_names))
    return {"seconds": seconds, "rows_in": len(entity_df), "rows_out": len(frame),
            "same_rows_in_order": same_rows, "missing_share": missing,
            "baseline_rss_mb": baseline, "call_peak_mb": peak, "call_cpu_s": cpu_s,
            "profile": top}


def profiled(call: Any, top: int = 14) -> tuple[Any, list[dict[str, Any]]]:
    """``call()`` under cProfile; its answer and the ``top`` functions by own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    answer = profiler.runcall(call)
    stats = pstats.Stats(profiler)
    entries = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = filename.split("site-packages/")[-1].split("include/")[-1]
        entries.append({"function": f"{where}:{line}({name})", "calls": calls,
                        "own_s": own, "cumulative_s": cumulative})
    by_own = sorted(entries, key=lambda e: e["own_s"], reverse=True)[:top]
    return answer, by_own


def worker_monitoring(rows: int) -> dict[str, Any]:
    """Run ``compute_window_report`` (with HTML) on the window's Parquet file, as the
    analysis does."""
    import pyarrow.parquet as pq

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.monitoring.drift import compute_window_report
    from airmlops.monitoring.reference import load_reference

    profile = load_reference(common.WORK_DIR / "monitoring" / f"profile-{REFERENCE_ROWS}")
    config = MonitoringConfig()
    spec = bench_monitoring.spec()
    html = work_dir() / f"monitoring-{rows}.html"
    path = bench_monitoring.frame_path("window", rows, SCENARIO)
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    # The window's Parquet file is streamed (read batch by batch inside the report), so the
    # read is part of the report's sample and quality stages, and read_s is 0.
    report = compute_window_report(profile, path, None, spec, config,
                                   window_id=f"scale-{rows}", html_path=html)
    seconds = time.perf_counter() - began
    for leftover in work_dir().glob(f"monitoring-{rows}.*"):  # the HTML and its snapshot
        leftover.unlink(missing_ok=True)
    metadata = pq.ParquetFile(path).metadata
    return {"seconds": seconds, "read_s": 0.0, "report_s": seconds,
            "rows_in": metadata.num_rows, "rows_out": report.rows, "sampled": report.sampled,
            "columns": metadata.num_columns, "phases": report.seconds,
            "drifted": sorted(k for k, v in report.columns.items() if v.drifted),
            "baseline_rss_mb": baseline, "call_peak_mb": common.memory_status_mb()}


def log_root(rows: int) -> Path:
    """The data root whose SQLite prediction log holds ``rows`` predictions."""
    return work_dir() / f"log-{rows}"


def write_prediction_log(rows: int) -> None:
    """The window's rows as a SQLite prediction log (the serving side's schema and JSON)."""
    import sqlite3

    import pandas as pd

    from airmlops.serving.prediction_log.records import clean_row, to_json
    from airmlops.serving.prediction_log.sqlite import _SQLITE_SCHEMA, sqlite_log_path

    path = sqlite_log_path(log_root(rows), "bench")
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    window = pd.read_parquet(bench_monitoring.frame_path("window", rows, SCENARIO))
    names = [f["name"] for f in bench_monitoring.FEATURES]
    stamps = window["ts"].astype("datetime64[us, UTC]").astype("int64").to_numpy()
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    db = sqlite3.connect(temporary)
    for statement in _SQLITE_SCHEMA:
        db.execute(statement)
    insert = ("INSERT INTO predictions (request_id, position, ts, model_version, entity_id,"
              " inputs, features, prediction, probability) VALUES (?,?,?,?,?,?,?,?,?)")
    for begin in range(0, len(window), 100_000):
        part = window.iloc[begin:begin + 100_000]
        records = part[names].to_dict("records")
        db.executemany(insert, [
            (f"r{begin + i}", 0, int(stamps[begin + i]), "1", str(customer),
             to_json(clean_row(record)), to_json(clean_row(record)), float(p), float(p))
            for i, (record, customer, p) in enumerate(zip(
                records, part["customer_id"], part["prediction"], strict=True))])
        db.commit()
    db.close()
    temporary.replace(path)


def worker_collect(rows: int) -> dict[str, Any]:
    """Read the window from the SQLite log in time slices, flatten it and write its Parquet
    file slice by slice, as ``collect_window`` does (``write_window_predictions``)."""
    import datetime as dt

    import pyarrow.parquet as pq

    from airmlops.monitoring.collect import write_window_predictions
    from airmlops.settings import Settings

    settings = Settings(data_root=log_root(rows), redis_url=None)
    spec = bench_monitoring.spec()
    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    end = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    path = work_dir() / f"collected-{rows}.parquet"
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    write_window_predictions(spec, start, end, settings, path)
    seconds = time.perf_counter() - began
    metadata = pq.ParquetFile(path).metadata
    path.unlink(missing_ok=True)
    return {"seconds": seconds, "rows_in": rows, "rows_out": metadata.num_rows,
            "columns": metadata.num_columns, "baseline_rss_mb": baseline}


def worker_prepare(kind: str, rows: int) -> dict[str, Any]:
    """Build (once) the input of a size in a child, so the parent stays small."""
    began = time.perf_counter()
    if kind == "pit":
        bench_pit.entity_frame(rows, entity_path(rows))
    elif kind == "log":
        write_prediction_log(rows)
    else:
        bench_monitoring.frame_path("window", rows, SCENARIO)
        if rows == REFERENCE_ROWS:
            bench_monitoring.frame_path("reference", rows, "stable")
            bench_monitoring.reference_dir(rows)
    return {"seconds": time.perf_counter() - began}


def entity_path(rows: int) -> Path:
    """The cached entity frame of ``rows`` rows (shared with ``bench_pit``)."""
    return common.WORK_DIR / "pit" / f"entities-{rows}.parquet"


def run_child(kind: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    """A worker of this script in a fresh process; a failure or timeout is an answer too."""
    done = common.run_measured([common.PYTHON, __file__, "--worker", kind, *args],
                               timeout=timeout)
    if done["timed_out"]:
        return {"failed": f"stopped after {timeout:.0f} s",
                "_process": {k: done[k] for k in ("wall_s", "peak_rss_mb", "cpu_s")}}
    if done["returncode"] != 0:
        return {"failed": done["stderr"].strip().splitlines()[-1:] or ["?"],
                "_process": {k: done[k] for k in ("wall_s", "peak_rss_mb", "cpu_s")}}
    answer = common.last_json_line(done["stdout"])
    answer["_process"] = common.process_figures(done, answer)
    return answer


# --- the curves ------------------------------------------------------------------------------


def free_memory_mb() -> float:
    """``MemAvailable`` of the machine in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pit_curve(sizes: list[int], try_big: bool, timeout: float) -> tuple[list[dict], list[str]]:
    """One run of ours per size (plus 30M when allowed); notes say what was skipped and why."""
    runs, notes = [], []
    run_child("prepare", "pit", str(sizes[0]), timeout=timeout)
    run_child("pit", str(sizes[0]), "0", timeout=timeout)  # warm the page cache, not recorded
    for rows in sizes:
        run_child("prepare", "pit", str(rows), timeout=timeout)
        answer = run_child("pit", str(rows), "0", timeout=timeout)
        runs.append({"rows": rows, **answer})
        common.log(f"pit {rows:,}: {describe(answer)}")
    load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    cpu = ", ".join(f"{r['rows']:,}: {r['call_cpu_s']:.1f} s" for r in runs if "call_cpu_s" in r)
    notes.append(f"pit: CPU time of the call (process_time, all threads) {cpu}; load average "
                 f"{load} (1/5/15 min) after these runs, on 2 shared cores: the wall time "
                 f"grows with the load, the CPU time hardly.")
    last = runs[-1]
    if try_big:
        seconds, peak = last.get("seconds", math.inf), last["_process"]["peak_rss_mb"]
        need = peak * BIG_PIT_ROWS / last["rows"] * 1.2
        if seconds >= BIG_PIT_MAX_S or "failed" in last:
            notes.append(f"30M rows not run: {last['rows']:,} rows took {seconds:.0f} s "
                         f"(the rule: under {BIG_PIT_MAX_S:.0f} s).")
        elif need > free_memory_mb() * 0.6:
            notes.append(f"30M rows not run: a linear estimate needs {need:,.0f} MB, more "
                         f"than 60% of the {free_memory_mb():,.0f} MB available.")
        else:
            run_child("prepare", "pit", str(BIG_PIT_ROWS), timeout=timeout)
            answer = run_child("pit", str(BIG_PIT_ROWS), "0", timeout=timeout)
            runs.append({"rows": BIG_PIT_ROWS, **answer})
            common.log(f"pit {BIG_PIT_ROWS:,}: {describe(answer)}")
    return runs, notes


def feast_curve(sizes: list[int], timeout: float) -> tuple[list[dict], list[str]]:
    """Feast's DuckDB store at the smallest and largest size, if its venv exists already."""
    python = common.FEAST_VENV / "bin" / "python"
    if not (python.exists() and (common.FEAST_VENV / ".installed").exists()):
        return [], ["Feast not run: benchmarks/.venv-feast does not exist on this machine."]
    import shutil

    spec = common.feast_spec(common.feature_data_root())
    runs = []
    notes = []
    for rows in sorted({sizes[0], sizes[-1]}):
        if runs and "failed" not in runs[0]:
            need = runs[0]["_process"]["peak_rss_mb"] * rows / runs[0]["rows"]
            if need > free_memory_mb() * 0.6:
                notes.append(f"Feast DuckDB not run at {rows:,} rows: a linear estimate from "
                             f"{runs[0]['rows']:,} needs {need:,.0f} MB, more than 60% of the "
                             f"{free_memory_mb():,.0f} MB available.")
                continue
        repo = work_dir() / "feast-duckdb"
        out = work_dir() / "feast-out.parquet"
        shutil.rmtree(repo, ignore_errors=True)
        try:
            answer = common.run_feast(python, "historical", {
                "spec": spec, "repo": str(repo), "offline": "duckdb",
                "entity_path": str(entity_path(rows)), "out_path": str(out)}, timeout=timeout)
        except RuntimeError as error:
            answer = {"failed": str(error).splitlines()[-1],
                      "_process": {"peak_rss_mb": None}}
        shutil.rmtree(repo, ignore_errors=True)
        out.unlink(missing_ok=True)
        if answer.get("timed_out"):
            answer["failed"] = f"stopped after {timeout:.0f} s"
        runs.append({"rows": rows, "rows_in": rows, "rows_out": answer.get("rows"), **answer})
        common.log(f"feast duckdb {rows:,}: {describe(answer)}")
    return runs, [*notes, f"Feast {common.feast_version(python)} DuckDB store, same entity "
                  f"frames; its peak is the worker's VmHWM; a run past {timeout:.0f} s is stopped."]


def profile_run(rows: int, timeout: float) -> dict[str, Any]:
    """One extra run of ours at ``rows`` under cProfile (slower than the timed run)."""
    run_child("prepare", "pit", str(rows), timeout=timeout)
    answer = run_child("pit", str(rows), "1", timeout=timeout)
    common.log(f"pit {rows:,} under cProfile: {describe(answer)}")
    return answer


def monitoring_curve(sizes: list[int], timeout: float) -> list[dict]:
    """One window per size, all against the 1M-row reference profile."""
    run_child("prepare", "monitoring", str(REFERENCE_ROWS), timeout=timeout)
    runs = []
    for rows in sizes:
        prepared = run_child("prepare", "monitoring", str(rows), timeout=timeout)
        if "failed" in prepared:
            runs.append({"rows": rows, **prepared})
            common.log(f"monitoring {rows:,}: preparing failed: {prepared['failed']}")
            continue
        answer = run_child("monitoring", str(rows), timeout=timeout)
        runs.append({"rows": rows, **answer})
        common.log(f"monitoring {rows:,}: {describe(answer)}")
    return runs


def collect_curve(sizes: list[int], timeout: float) -> list[dict]:
    """The collection step per size: the SQLite log written once, then read and flattened."""
    runs = []
    for rows in sizes:
        run_child("prepare", "monitoring", str(rows), timeout=timeout)
        prepared = run_child("prepare", "log", str(rows), timeout=timeout)
        answer = prepared if "failed" in prepared else run_child(
            "collect", str(rows), timeout=timeout)
        runs.append({"rows": rows, **answer})
        common.log(f"collect {rows:,}: {describe(answer)}")
    return runs


def describe(answer: dict[str, Any]) -> str:
    """One log line for a worker's answer."""
    if "failed" in answer:
        return f"failed ({answer['failed']})"
    return f"{answer['seconds']:.2f} s, peak {answer['_process']['peak_rss_mb']:.0f} MB"


# --- the report ------------------------------------------------------------------------------


def growth(runs: list[dict]) -> dict[str, Any] | None:
    """Time and memory growth from the smallest to the largest successful size, and the
    log-log slopes (1 = linear, below 1 = sub-linear)."""
    done = [r for r in runs if "failed" not in r]
    if len(done) < 2:
        return None
    first, last = done[0], done[-1]
    rows_x = last["rows"] / first["rows"]
    time_x = last["seconds"] / first["seconds"]
    mem_x = last["_process"]["peak_rss_mb"] / first["_process"]["peak_rss_mb"]
    shape = {"from": first["rows"], "to": last["rows"], "rows_x": rows_x, "time_x": time_x,
             "memory_x": mem_x, "time_slope": math.log(time_x) / math.log(rows_x),
             "memory_slope": math.log(mem_x) / math.log(rows_x), "net_memory_slope": None}
    if first.get("baseline_rss_mb") and last.get("baseline_rss_mb"):
        net_x = ((last["_process"]["peak_rss_mb"] - last["baseline_rss_mb"])
                 / (first["_process"]["peak_rss_mb"] - first["baseline_rss_mb"]))
        shape["net_memory_slope"] = math.log(net_x) / math.log(rows_x)
    return shape


def curve_rows(label: str, runs: list[dict]) -> list[list[Any]]:
    """The main table's rows of one curve."""
    rows = []
    for r in runs:
        if "failed" in r:
            rows.append([label, r["rows"], f"failed: {r['failed']}",
                         r["_process"]["peak_rss_mb"], None, None, None, None])
            continue
        peak = r["_process"]["peak_rss_mb"]
        base = r.get("baseline_rss_mb")
        rows.append([label, r["rows"], r["seconds"], peak,
                     None if base is None else peak - base, r["rows"] / r["seconds"] / 1e6,
                     r.get("rows_out"), r.get("rows_out") == r["rows"]])
    return rows


def goal_rows(curves: dict[str, list[dict]]) -> list[list[Any]]:
    """Issue 18's goals against the measured curves."""
    table = []
    for kind, (rows, max_s, max_mb) in GOALS.items():
        run = next((r for r in curves[kind] if r["rows"] == rows and "failed" not in r), None)
        if run is None:
            table.append([kind, f"{rows:,} rows in <= {max_s:.0f} s, <= {max_mb:,.0f} MB",
                          "not measured", None])
            continue
        peak = run["_process"]["peak_rss_mb"]
        table.append([kind, f"{rows:,} rows in <= {max_s:.0f} s, <= {max_mb:,.0f} MB",
                      f"{run['seconds']:.1f} s, {peak:,.0f} MB",
                      run["seconds"] <= max_s and peak <= max_mb])
    pit = [r for r in curves["pit"] if "failed" not in r]
    lost = sum(r["rows"] - (r.get("rows_out") or 0) for r in pit)
    table.append(["pit", "no row lost (rows out = rows in, same order)", f"{lost} lost",
                  lost == 0 and all(r.get("same_rows_in_order") for r in pit)])
    shape = growth(curves["pit"])
    if shape:
        net = shape["net_memory_slope"] or shape["memory_slope"]
        table.append(["pit", "time at most linear, memory sub-linear (slopes: time / peak / "
                      "peak - baseline)", f"{shape['time_slope']:.2f} / "
                      f"{shape['memory_slope']:.2f} / {net:.2f}",
                      shape["time_slope"] <= 1.05 and net < 0.9])
    return table


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """Time and peak memory against rows, log-log, with a linear guide from the first point."""
    labels = {"pit": "point-in-time (airmlops)", "feast": "point-in-time (Feast DuckDB)",
              "monitoring": "monitoring window (airmlops)",
              "collect": "collect window from SQLite log"}
    series = {}
    for kind, runs in curves.items():
        done = [r for r in runs if "failed" not in r]
        if done:
            series[labels[kind]] = ([r["rows"] for r in done], [r["seconds"] for r in done],
                                    [r["_process"]["peak_rss_mb"] for r in done])
    common.time_and_memory_figure(path, "Scale curves (dotted: linear from the first point)",
                                  "rows", series, linear_guide=True)


def report(curves: dict[str, list[dict]], profile: dict[str, Any] | None,
           notes: list[str], name: str = "scale_offline") -> None:
    """Print the tables, write ``results/<name>.{md,json,png}``."""
    headers = ["curve", "rows", "seconds", "peak RSS MB", "peak - baseline MB", "M rows/s",
               "rows out", "all rows"]
    table = (curve_rows("pit: airmlops", curves["pit"])
             + curve_rows("pit: Feast DuckDB", curves["feast"])
             + curve_rows("monitoring: airmlops", curves["monitoring"])
             + curve_rows("collect from SQLite log", curves.get("collect", [])))
    shapes = {kind: growth(runs) for kind, runs in curves.items()}
    shape_rows = [[kind, f"{s['from']:,} -> {s['to']:,}", f"{s['time_x']:.1f}x",
                   f"{s['memory_x']:.1f}x", s["time_slope"], s["memory_slope"],
                   s.get("net_memory_slope")]
                  for kind, s in shapes.items() if s]
    tables = [("", headers, table),
              ("Growth (log-log slope: 1 = linear, < 1 = sub-linear)",
               ["curve", "rows", "time", "memory", "time slope", "memory slope",
                "peak - baseline slope"], shape_rows),
              ("Goals (issue 18)", ["curve", "goal", "measured", "met"], goal_rows(curves))]
    phases = [[f"{r['rows']:,}", r["read_s"], *(r["phases"].get(k) for k in phase_names(
        curves))] for r in curves["monitoring"] if "failed" not in r]
    if phases:
        tables.append(("Monitoring stages (seconds)", ["rows", "read parquet",
                                                       *phase_names(curves)], phases))
    if profile and "failed" not in profile:
        top = [[p["function"], p["calls"], p["own_s"], p["cumulative_s"]]
               for p in profile["profile"][:10]]
        tables.append((f"cProfile of one {profile['rows_in']:,}-row point-in-time run "
                       f"({profile['seconds']:.1f} s under the profiler), by own time",
                       ["function", "calls", "own s", "cumulative s"], top))
    load = Path("/proc/loadavg").read_text().split()[:3]
    if not any(n.startswith("load average") for n in notes):
        notes = [*notes, f"load average when written: {' '.join(load)} (2 cores shared: one "
                 "run per size, not a median)."]
    results = {"curves": curves, "growth": shapes, "profile": profile,
               "reference_rows": REFERENCE_ROWS, "goals": GOALS}
    common.write_results(name, "Scale curves: point-in-time training set and "
                         "monitoring window", results, tables, notes)
    plot(curves, common.RESULTS_DIR / f"{name}.png")


def phase_names(curves: dict[str, list[dict]]) -> list[str]:
    """The stage names of ``compute_window_report``'s timings."""
    for r in curves["monitoring"]:
        if "failed" not in r:
            return list(r["phases"])
    return []


def main() -> int:
    """Measure the chosen curves (or run one worker) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100k and 300k rows only, to results/scale_offline_quick.*")
    parser.add_argument("--pit-sizes", help="comma-separated entity rows")
    parser.add_argument("--monitoring-sizes", help="comma-separated window rows")
    parser.add_argument("--collect-sizes", help="comma-separated rows of the SQLite log")
    parser.add_argument("--profile-rows", type=int, help="rows of the cProfile run (0: none)")
    parser.add_argument("--curves", default=",".join(CURVES),
                        help="which to measure (none: redraw); others kept from the last JSON")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="per child, seconds")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "pit":
            answer = worker_pit(str(entity_path(int(rest[0]))), rest[1] == "1")
        elif kind == "monitoring":
            answer = worker_monitoring(int(rest[0]))
        elif kind == "collect":
            answer = worker_collect(int(rest[0]))
        else:
            answer = worker_prepare(rest[0], int(rest[1]))
        answer["vmhwm_mb"] = common.memory_status_mb()
        print(json.dumps(answer, default=str), flush=True)
        return 0

    def sizes(text: str | None, default: tuple[int, ...]) -> list[int]:
        return [int(s) for s in text.split(",")] if text else list(
            QUICK_SIZES if args.quick else default)

    pit_sizes = sizes(args.pit_sizes, PIT_SIZES)
    wanted = set(args.curves.split(","))
    curves, profile, notes = saved_results(wanted, args.quick)
    common.feature_data_root()
    if "pit" in wanted:
        curves["pit"], big_notes = pit_curve(
            pit_sizes, try_big=not args.quick and not args.pit_sizes, timeout=args.timeout)
        notes += big_notes
    if "feast" in wanted:
        curves["feast"], feast_notes = ([], ["Feast not run (--no-feast)."]) if args.no_feast \
            else feast_curve(pit_sizes, args.timeout)
        notes += feast_notes
    if "profile" in wanted:
        rows = args.profile_rows if args.profile_rows is not None else pit_sizes[-1]
        profile = profile_run(rows, args.timeout) if rows else None
    if "monitoring" in wanted:
        curves["monitoring"] = monitoring_curve(
            sizes(args.monitoring_sizes, MONITORING_SIZES), args.timeout)
    if "collect" in wanted:
        curves["collect"] = collect_curve(
            sizes(args.collect_sizes, COLLECT_SIZES), args.timeout)
    notes += [
        "pit: time = get_historical_features on the loaded entity frame (3 views x 3M stored "
        "rows, 14 + 2 on-demand features); peak = the worker's VmHWM (imports, entity frame, "
        "result); the result is not written out. rows out = len(result), checked row by row.",
        f"monitoring: compute_window_report with HTML on the window's Parquet file (streamed "
        f"batch by batch: the read is inside the sample and quality stages) against the "
        f"reference profile of a {REFERENCE_ROWS:,}-row stable frame (the log read: collect); "
        f"the drift stage includes Evidently's import (several seconds, overlapped with the "
        f"stream in a background thread).",
        "collect: the window's rows in a SQLite prediction log (serving's schema, 20 inputs as "
        "JSON), read in 8 time slices with write_window_predictions as collect_window does "
        "(only the needed columns, the features JSON parsed once per slice, each slice "
        "written as a Parquet row group; the label join left out).",
    ]
    report(curves, profile, list(dict.fromkeys(notes)),
           "scale_offline_quick" if args.quick else "scale_offline")
    return 0


def saved_results(wanted: set[str], quick: bool) -> tuple[dict[str, list[dict]], Any, list[str]]:
    """The curves not ``wanted`` (and their notes) from the last JSON, else empty."""
    curves: dict[str, list[dict]] = {"pit": [], "feast": [], "monitoring": [], "collect": []}
    path = common.RESULTS_DIR / "scale_offline.json"
    if quick or wanted >= set(CURVES) or not path.exists():
        return curves, None, []
    saved = json.loads(path.read_text())
    for kind in curves:
        if kind not in wanted:
            curves[kind] = saved["results"]["curves"].get(kind, [])
    profile = None if "profile" in wanted else saved["results"].get("profile")
    keep = [n for n in saved["notes"] if not n.startswith(("pit:", "monitoring:", "collect:",
                                                          "curves other", "tables redrawn"))
            and not (("pit" in wanted and n.startswith("30M"))
                     or ("feast" in wanted and n.startswith("Feast")))]
    if not wanted & set(CURVES):
        return curves, profile, [*keep, f"tables redrawn from {saved['measured_at']}'s JSON."]
    return curves, profile, [*keep, f"curves other than {', '.join(sorted(wanted))} kept "
                             f"from the run measured {saved['measured_at']}."]


if __name__ == "__main__":
    sys.exit(main())
