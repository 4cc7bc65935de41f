"""Scale: training DAG wall time with 1, 4 and 8 pipelines triggered at once.

One embedded platform (PostgreSQL, MLflow, Airflow with LocalExecutor; started by
:func:`airmlops.platform.start_platform` in a temporary run dir on free loopback ports, as the
integration tests do) serves the repository's ``dags/`` with ``MLOPS_PIPELINES_DIR`` pointing at
1 + 4 + 8 renamed copies of the demo spec (own name, own port, ``schedule: null``), every DAG
paused at creation. Each case gets pipelines of its own (no champion yet, as a first run): it
unpauses their training DAGs, triggers them all at once through the REST API, then waits until
every run has finished (bounded per case). Recorded: the case's wall time (first trigger to last
run done), each run's duration (its start to end date), the peak resident memory of the
platform's process tree (components, task processes, PostgreSQL; sampled every 2 s).

By default the runs carry ``skip_deploy: true``: every training stage runs (ingest,
validate_data, preprocess, train, validate_model, register) but no bento is built and no model
server started, so the memory measured is the platform's and the training's, not N model
servers'. ``--deploy`` runs the whole DAG (containerize, deploy, the bake period of monitor).

Run: ``.venv/bin/python benchmarks/bench_scale_training.py`` (``--cases 1 4``, ``--deploy``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from bench_dag_parse import write_specs
from bench_scale_scheduler import bench_platform, common_load, tree_rss_mb

CASES = (1, 4, 8)
TIMEOUT_S = {1: 600.0, 4: 900.0, 8: 900.0}
FINISHED = {"success", "failed"}


def write_unscheduled_specs(folder: Path, count: int) -> list[str]:
    """``count`` renamed copies of the demo spec without a schedule; their pipeline names."""
    write_specs(folder, count)
    for path in folder.glob("*.yaml"):
        text, found = re.subn(r"(?m)^schedule: .*$", "schedule: null", path.read_text())
        if found != 1:
            raise RuntimeError(f"{path} has no top-level schedule")
        path.write_text(text)
    return [f"churn{index:04d}" for index in range(1, count + 1)]


def run_state(platform: Any, token: str, dag_id: str, run_id: str) -> dict[str, Any]:
    from airmlops.platform import http_client

    with http_client() as client:
        response = client.get(f"{platform.base_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}",
                              headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json()


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def run_case(platform: Any, names: list[str], deploy: bool, timeout: float) -> dict[str, Any]:
    """Trigger the training DAG of every pipeline in ``names`` at once; wait for all."""
    from airmlops.platform import api_token, set_dag_paused, trigger_dag, wait_for_dag

    token = api_token(platform.base_url, platform.username, platform.password)
    dag_ids = [f"{name}_training" for name in names]
    for dag_id in dag_ids:
        wait_for_dag(platform.base_url, token, dag_id, timeout=300.0, progress=common.log)
        set_dag_paused(platform.base_url, token, dag_id, False)
    conf = {"trigger_reason": "scale benchmark", "skip_deploy": not deploy}
    load_before, peak_rss = common_load(), tree_rss_mb(platform)
    started = time.monotonic()
    runs = {dag_id: trigger_dag(platform.base_url, token, dag_id, conf)["dag_run_id"]
            for dag_id in dag_ids}
    states: dict[str, dict[str, Any]] = {}
    while len(states) < len(runs):
        if time.monotonic() - started > timeout:
            break
        time.sleep(3.0)
        peak_rss = max(peak_rss, tree_rss_mb(platform))
        for dag_id, run_id in runs.items():
            if dag_id not in states:
                answer = run_state(platform, token, dag_id, run_id)
                if answer["state"] in FINISHED:
                    states[dag_id] = answer
                    common.log(f"{dag_id}: {answer['state']} after "
                               f"{time.monotonic() - started:.0f} s")
    wall = time.monotonic() - started
    for dag_id in set(runs) - set(states):  # timed out: record where they were
        states[dag_id] = run_state(platform, token, dag_id, runs[dag_id])
    durations = [seconds_between(s.get("start_date"), s.get("end_date")) for s in states.values()]
    done = [d for d in durations if d is not None]
    return {
        "pipelines": len(names), "wall_s": wall, "timed_out": wall > timeout,
        "succeeded": sum(s["state"] == "success" for s in states.values()),
        "failed": sum(s["state"] == "failed" for s in states.values()),
        "run_s": done, "run_median_s": statistics.median(done) if done else None,
        "run_max_s": max(done) if done else None, "wall_per_pipeline_s": wall / len(names),
        "peak_tree_rss_mb": peak_rss, "load_before": load_before, "load_after": common_load(),
        "runs": {d: {"run_id": s["dag_run_id"], "state": s["state"],
                     "start_date": s.get("start_date"), "end_date": s.get("end_date")}
                 for d, s in states.items()},
    }


def plot(cases: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    counts = [c["pipelines"] for c in cases]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(counts, [c["wall_s"] for c in cases], "o-", label="wall, all runs")
    left.plot(counts, [c["run_median_s"] for c in cases], "s--", label="run duration, median")
    left.plot(counts, [counts[0] and cases[0]["wall_s"] * n / counts[0] for n in counts], ":",
              color="grey", label="linear from the first case")
    left.set(xlabel="training runs triggered at once", ylabel="seconds",
             title="training DAG wall time")
    left.legend()
    right.plot(counts, [c["peak_tree_rss_mb"] for c in cases], "o-")
    right.set(xlabel="training runs triggered at once", ylabel="MB",
              title="platform process tree, peak RSS", ylim=(0, None))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=list(CASES))
    parser.add_argument("--deploy", action="store_true",
                        help="run containerize, deploy and monitor too (no skip_deploy)")
    args = parser.parse_args()
    common.WORK_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scale-training-", dir=common.WORK_DIR))
    os.chmod(scratch, 0o755)
    names = write_unscheduled_specs(scratch / "pipelines", sum(args.cases))
    cases: list[dict[str, Any]] = []
    try:
        with bench_platform("training", scratch / "pipelines", {}, scratch / "data",
                            paused=True) as platform:
            common.log(f"platform up: {platform.timings}")
            for count in args.cases:
                mine, names = names[:count], names[count:]
                cases.append(run_case(platform, mine, args.deploy,
                                      TIMEOUT_S.get(count, 900.0)))
                common.log(f"{count} pipelines: {cases[-1]['wall_s']:.0f} s wall, "
                           f"{cases[-1]['succeeded']} succeeded")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(cases, args.deploy)
    return 0


def report(cases: list[dict[str, Any]], deploy: bool) -> None:
    png = plot(cases, common.RESULTS_DIR / "scale_training.png")
    first = cases[0]
    rows = [[c["pipelines"], f"{c['succeeded']}/{c['pipelines']}", c["wall_s"],
             c["wall_per_pipeline_s"], c["run_median_s"], c["run_max_s"],
             c["wall_s"] / (first["wall_s"] * c["pipelines"] / first["pipelines"]),
             c["peak_tree_rss_mb"], c["load_before"], c["load_after"]] for c in cases]
    stages = ("every stage, containerize, deploy and the monitor bake included" if deploy else
              "ingest, validate_data, preprocess, train, validate_model, register "
              "(skip_deploy: true)")
    common.write_results(
        "scale_training", "Scale: training DAG wall time with 1, 4 and 8 pipelines at once",
        {"cases": cases, "deploy": deploy},
        [("", ["pipelines", "succeeded", "wall s (all done)", "wall per pipeline s",
               "run duration median s", "run duration max s", "wall / linear from 1",
               "platform peak RSS MB", "load before", "load after"], rows)],
        notes=["one embedded platform (PostgreSQL, MLflow, Airflow 3 LocalExecutor on "
               "loopback) for all cases; each case triggers the training DAGs of pipelines of "
               "its own (fresh copies of the demo spec, so no champion to compare with) at once "
               "through the REST API",
               f"stages run: {stages}",
               "wall = first trigger to last run finished (polled every 3 s); run duration = "
               "the run's start_date to end_date; wall / linear = wall / (wall of the first "
               "case x pipelines / its pipelines): 1.0 is linear growth",
               "platform peak RSS = every component's process group (task processes "
               "included) plus PostgreSQL, sampled every 2-3 s",
               "load average (1 / 5 min) beside each case: the 2 cores are shared with other "
               "work, wall times are noisy",
               "curve: results/scale_training.png" if png else "no curve: no matplotlib"])


if __name__ == "__main__":
    sys.exit(main())
