"""Benchmark 4: one monitoring window, airmlops' report vs Evidently's full DataDriftPreset.

Frames of 20 model inputs (the churn simulator's 9 plus 9 numeric and 2 categorical synthetic
columns) and a prediction column, for windows of 100k, 300k and 1M rows; the reference is a
stable frame of the same size, the window has covariate drift (three inputs and the prediction
move). A stable window of 100k rows checks that nobody raises a false alarm.

- ours: what the monitoring task runs per window: ``load_reference`` (the champion's profile,
  summarized once at deploy and timed separately), then ``compute_window_report`` on the whole
  window with its HTML report. Drift is tested on a fixed-size time-stratified sample; data
  quality is exact over the whole window.
- Evidently 0.7: ``Report([DataDriftPreset(...)])`` on the full reference and window with the
  same methods and thresholds (Wasserstein 0.1 for numbers, Jensen-Shannon 0.1 for
  categories), plus its HTML.

Each run is its own process: time is the report call, peak memory the process's maximum
resident set (``wait4``; the loaded frames count for both). Decisions compared: each column's
drift verdict, the prediction's, and the window's (drift share >= the policy's threshold).

Run: ``.venv/bin/python benchmarks/bench_monitoring.py`` (``--sizes 100000,1000000``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FEATURES = [
    {"name": "plan", "type": "categorical"}, {"name": "region", "type": "categorical"},
    {"name": "age", "type": "numeric", "min": 18, "max": 100},
    {"name": "tenure_days", "type": "numeric", "min": 0, "max": 3650},
    {"name": "monthly_fee", "type": "numeric", "min": 0, "max": 500},
    {"name": "sessions", "type": "numeric", "min": 0, "max": 200},
    {"name": "minutes_watched", "type": "numeric", "min": 0, "max": 1440},
    {"name": "support_tickets", "type": "numeric", "min": 0, "max": 50},
    {"name": "payment_failures", "type": "numeric", "min": 0, "max": 20},
    *({"name": f"x{i}", "type": "numeric"} for i in range(9)),
    {"name": "c1", "type": "categorical"}, {"name": "c2", "type": "categorical"},
]
THRESHOLD = 0.1


def spec() -> Any:
    from airmlops.spec import parse_spec

    return parse_spec({
        "name": "bench", "task": "binary_classification", "source": {"kind": "simulator"},
        "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
        "features": FEATURES,
        "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
        "gates": {"primary_metric": "roc_auc"}})


def build_frame(rows: int, seed: int, scenario: str) -> Any:
    import numpy as np

    from airmlops.data.simulator import simulate_observations
    from airmlops.spec import SimulatorSource

    customers = int(rows * 7 / 0.875 / 32) + 1000
    data = simulate_observations(SimulatorSource(kind="simulator", customers=customers, seed=seed),
                                 dt.date(2026, 4, 1), dt.date(2026, 5, 3), scenario)
    data = data.iloc[:rows].copy()
    rng = np.random.default_rng(seed)
    n = len(data)
    for i in range(9):
        data[f"x{i}"] = (rng.lognormal(0, 1, n) if i % 3 == 0 else rng.normal(i, 1 + i, n)
                         if i % 3 == 1 else rng.poisson(2 + i, n).astype(float))
    data["c1"] = np.array([f"k{j}" for j in range(10)], dtype=object)[rng.integers(0, 10, n)]
    data["c2"] = np.array([f"m{j}" for j in range(50)], dtype=object)[rng.zipf(1.5, n) % 50]
    logit = -0.5 - 0.3 * np.log1p(data["sessions"]) + 0.8 * data["payment_failures"]
    data["prediction"] = 1 / (1 + np.exp(-logit))
    data["ts"] = data["event_timestamp"]
    return data.reset_index(drop=True)


def frame_path(kind: str, rows: int, scenario: str) -> Path:
    """The cached frame (reference: seed 7, stable; window: seed 11, ``scenario``)."""
    path = common.WORK_DIR / "monitoring" / f"{kind}-{rows}-{scenario}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = 7 if kind == "reference" else 11
        build_frame(rows, seed, scenario).to_parquet(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


def reference_dir(rows: int) -> tuple[Path, float]:
    """The reference profile of the stable frame (summarized once, as at deploy)."""
    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.monitoring.reference import summarize_reference

    directory = common.WORK_DIR / "monitoring" / f"profile-{rows}"
    marker = directory / "seconds.json"
    if marker.exists():
        return directory, json.loads(marker.read_text())["seconds"]
    import pandas as pd

    frame = pd.read_parquet(frame_path("reference", rows, "stable"))
    began = time.perf_counter()
    summarize_reference(frame, spec(), MonitoringConfig(), directory)
    seconds = time.perf_counter() - began
    marker.write_text(json.dumps({"seconds": seconds}))
    return directory, seconds


# --- workers (each in its own process) -------------------------------------------------------


def worker_ours(rows: int, scenario: str) -> dict[str, Any]:
    import evidently  # noqa: F401  (imported before the baseline, as Evidently's worker does)
    import pandas as pd

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.monitoring.drift import compute_window_report
    from airmlops.monitoring.reference import load_reference

    profile = load_reference(common.WORK_DIR / "monitoring" / f"profile-{rows}")
    window = pd.read_parquet(frame_path("window", rows, scenario))
    config = MonitoringConfig()
    html = common.WORK_DIR / "monitoring" / f"ours-{rows}-{scenario}.html"
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    report = compute_window_report(profile, window, None, spec(), config,
                                   window_id=f"bench-{rows}", html_path=html)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "baseline_rss_mb": baseline, "phases": report.seconds,
            "sampled": report.sampled,
            "drifted": {k: v.drifted for k, v in report.columns.items()},
            "scores": {k: v.score for k, v in report.columns.items()},
            "prediction": report.prediction_drift.drifted if report.prediction_drift else None,
            "drift_share": report.drift_share,
            "window_drift": "drift_share" in report.breaches,
            "policy_drift_share": config.policy.max_drift_share}


def worker_evidently(rows: int, scenario: str) -> dict[str, Any]:
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from airmlops.monitoring.config import MonitoringConfig

    the_spec = spec()
    numeric = [*the_spec.numeric_features, "prediction"]
    categorical = list(the_spec.categorical_features)
    columns = numeric + categorical
    reference = pd.read_parquet(frame_path("reference", rows, "stable"), columns=columns)
    window = pd.read_parquet(frame_path("window", rows, scenario), columns=columns)
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical,
                                text_columns=[], datetime_columns=[], unknown_columns=[],
                                list_columns=[])
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    snapshot = Report([DataDriftPreset(num_method="wasserstein", num_threshold=THRESHOLD,
                                       cat_method="jensenshannon", cat_threshold=THRESHOLD)]).run(
        Dataset.from_pandas(window, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition))
    run_seconds = time.perf_counter() - began
    html = snapshot.get_html_str(as_iframe=False)
    seconds = time.perf_counter() - began
    scores = {m["config"]["column"]: m["value"] for m in snapshot.dict()["metrics"]
              if m["config"]["type"] == "evidently:metric_v2:ValueDrift"}
    drifted = {k: bool(v >= THRESHOLD) for k, v in scores.items() if k != "prediction"}
    share = sum(drifted.values()) / len(drifted)
    policy = MonitoringConfig().policy.max_drift_share
    return {"seconds": seconds, "run_seconds": run_seconds, "html_bytes": len(html),
            "baseline_rss_mb": baseline, "drifted": drifted, "scores": scores,
            "prediction": bool(scores["prediction"] >= THRESHOLD), "drift_share": share,
            "window_drift": share >= policy, "policy_drift_share": policy}


def run_worker(kind: str, rows: int, scenario: str) -> dict[str, Any]:
    return common.run_worker(__file__, kind, str(rows), scenario)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "ROWS", "SCENARIO"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, rows, scenario = args.worker
        handler = {"ours": worker_ours, "evidently": worker_evidently}[kind]
        answer = handler(int(rows), scenario)
        answer["vmhwm_mb"] = common.memory_status_mb()
        print(json.dumps(answer), flush=True)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [(rows, "covariate_drift") for rows in sizes] + [(min(sizes), "stable")]
    results: dict[str, Any] = {"inputs": len(FEATURES), "threshold": THRESHOLD, "runs": []}
    table, goal_rows = [], []
    for rows, scenario in runs:
        frame_path("reference", rows, "stable")
        frame_path("window", rows, scenario)
        _, summarize_s = reference_dir(rows)
        ours = run_worker("ours", rows, scenario)
        theirs = run_worker("evidently", rows, scenario)
        columns = sorted(ours["drifted"])
        agree = sum(ours["drifted"][c] == theirs["drifted"].get(c) for c in columns)
        entry = {"rows": rows, "scenario": scenario, "summarize_reference_s": summarize_s,
                 "ours": ours, "evidently": theirs, "columns_agreeing": agree,
                 "columns": len(columns), "prediction_agrees": ours["prediction"] ==
                 theirs["prediction"], "window_agrees": ours["window_drift"] ==
                 theirs["window_drift"],
                 "ours_drifted": sorted(c for c in columns if ours["drifted"][c]),
                 "evidently_drifted": sorted(c for c, v in theirs["drifted"].items() if v)}
        results["runs"].append(entry)
        common.log(f"{rows} {scenario}: ours {ours['seconds']:.2f} s, Evidently "
                   f"{theirs['seconds']:.2f} s, columns agreeing {agree}/{len(columns)}")
        table.append([f"{rows:,}", scenario, ours["seconds"], ours["_process"]["peak_rss_mb"],
                      theirs["seconds"], theirs["_process"]["peak_rss_mb"],
                      theirs["seconds"] / ours["seconds"], f"{agree}/{len(columns)}",
                      entry["prediction_agrees"], entry["window_agrees"],
                      ", ".join(entry["ours_drifted"]) or "none"])
    drift_runs = [r for r in results["runs"] if r["scenario"] == "covariate_drift"]
    growth = []
    for kind in ("ours", "evidently"):
        first, last = drift_runs[0], drift_runs[-1]
        factor = last[kind]["seconds"] / first[kind]["seconds"]
        growth.append([kind, " -> ".join(f"{r[kind]['seconds']:.2f}" for r in drift_runs),
                       f"{factor:.1f}x for {last['rows'] / first['rows']:.0f}x rows"])
    results["growth"] = {row[0]: row[1] for row in growth}
    biggest = drift_runs[-1]
    ok_time = biggest["ours"]["seconds"] <= 15
    ok_memory = biggest["ours"]["_process"]["peak_rss_mb"] <= 1024
    ok_same = all(r["columns_agreeing"] == r["columns"] and r["prediction_agrees"]
                  and r["window_agrees"] for r in results["runs"])
    goal_rows = [[f"<= 15 s for {biggest['rows']:,} rows", f"{biggest['ours']['seconds']:.2f} s",
                  ok_time],
                 [f"<= 1 GB for {biggest['rows']:,} rows",
                  f"{biggest['ours']['_process']['peak_rss_mb']:.0f} MB", ok_memory],
                 ["same decisions as Evidently (every run)", "see agreement columns", ok_same]]
    common.write_results(
        "monitoring", "4. Monitoring one window (20 inputs + prediction)", results,
        [("", ["rows", "window", "ours s", "ours peak MB", "Evidently s", "Evidently peak MB",
               "speedup", "columns agreeing", "prediction agrees", "window agrees",
               "ours: drifted"], table),
         ("Growth with rows (seconds, covariate-drift windows)", ["report", "seconds",
                                                                  "growth"], growth),
         ("Goals", ["goal", "measured", "met"], goal_rows)],
        notes=["ours = load the champion's reference profile + compute_window_report (drift on "
               "a time-stratified sample, exact data quality over all rows, HTML); the profile "
               "is summarized once at deploy: "
               + ", ".join(f"{r['rows']:,} rows {r['summarize_reference_s']:.1f} s"
                           for r in drift_runs) + ".",
               "Evidently = DataDriftPreset on the full frames with the same explicit methods "
               "and thresholds, run + HTML. Peak = the process's maximum RSS, frames included."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
