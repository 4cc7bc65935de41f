"""Scale out: training DAG wall time with 1, 4 and 8 pipelines at once, on 1 and 3 Celery workers.

The compose stack of docker-compose.yaml (+ docker-compose.host.yaml), brought up on the local
engine exactly as tests/compose does it (scripts/ensure-compose.sh builds the images offline;
generated secrets, free loopback ports). For each worker count (the stack is started with the
first and scaled with ``up --scale airflow-worker=N``), and each number of pipelines:

- that many fresh copies of the small compose spec (1,000 customers, 3 s bake, each on its own
  stable port) are written to the pipelines folder and parsed;
- their training DAGs are triggered at once through the REST API, with ``skip_deploy`` (ingest
  to register, as ``bench_scale_training.py`` runs them; ``--deploy`` adds containerize,
  deploy and monitor: a model image per pipeline);
- measured: wall time from the first trigger to the last run's end, each run's own duration
  (the API's start and end dates), how many succeeded, and on how many worker replicas their
  task instances ran (from the replicas' container logs);
- then the deployments are stopped (their model containers would otherwise pile up).

Each case is bounded (``--case-timeout``, default 1800 s): a case past it is recorded as a
timeout and the benchmark goes on. Results: benchmarks/results/scale_workers.{md,json,png}.

Run: ``make bench-workers`` or ``.venv/bin/python benchmarks/bench_scale_workers.py``
(``--pipelines 1,4 --workers 1,3`` for a shorter run; ``--concurrency`` sets each worker's task
slots, default 2). Long: about an hour for the full grid on 2 cores. Not one of ``bench_scale_*``
on purpose: ``make bench-scale`` stays short.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "compose"))
import common
from stack_helpers import (
    ADMIN_USER,
    GIT_COMMIT,
    WORKER,
    AirflowApi,
    ComposeStack,
    ensure_images,
    free_port,
    start_stack,
    stop_stack,
    write_spec,
)

NAME = "scale_workers"
PIPELINES = (1, 4, 8)
WORKERS = (1, 3)
CASE_TIMEOUT_S = 1800.0


def parse_counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(",") if part.strip())
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return counts


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg says them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stop_deployments(stack: ComposeStack) -> None:
    """Stop every model container and proxy the stack's deploys started, as `make stop` does."""
    stack.exec(WORKER, "python", "-c",
               "from airmlops.platform import stop_deployments; stop_deployments()", timeout=300)


def replicas_used(stack: ComposeStack, run_ids: set[str]) -> int:
    """On how many worker replicas a workload of ``run_ids`` was executed (container logs)."""
    used = 0
    for container in stack.replica_ids(WORKER):
        log = subprocess.run(["docker", "logs", container], capture_output=True, text=True,
                             timeout=120, check=False)
        text = log.stdout + log.stderr
        if any(f"run_id={run_id}/" in text for run_id in run_ids):
            used += 1
    return used


def seconds_between(start: str | None, end: str | None) -> float | None:
    import datetime as dt

    if not start or not end:
        return None
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def run_case(stack: ComposeStack, workers: int, pipelines: int, timeout: float,
             deploy: bool = False) -> dict[str, Any]:
    """Trigger ``pipelines`` fresh training DAGs at once (``skip_deploy`` unless ``deploy``);
    follow them (bounded) to their end."""
    tag = secrets.token_hex(2)
    names = [f"bench_w{workers}_p{pipelines}_{tag}_{i}" for i in range(pipelines)]
    folder = stack.workdir / "pipelines"
    for name in names:
        write_spec(folder, free_port(), name)
    api = AirflowApi(stack.airflow_url, ADMIN_USER, stack.password)
    runs = {f"{name}_training": f"bench-{tag}-{i}" for i, name in enumerate(names)}
    try:
        for dag_id in runs:
            api.wait_for_dag(dag_id, timeout=300)
        load_before = load_average()
        started = time.monotonic()
        for dag_id, run_id in runs.items():
            api.trigger(dag_id, run_id,
                        conf={"git_commit": GIT_COMMIT, "skip_deploy": not deploy})
        states: dict[str, str] = {}
        durations: list[float] = []
        while len(states) < len(runs) and time.monotonic() - started < timeout:
            for dag_id, run_id in runs.items():
                if dag_id in states:
                    continue
                run = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
                if run["state"] in ("success", "failed"):
                    states[dag_id] = run["state"]
                    duration = seconds_between(run.get("start_date"), run.get("end_date"))
                    if duration is not None:
                        durations.append(duration)
            time.sleep(5)
        wall = time.monotonic() - started
    finally:
        api.close()
    timed_out = len(states) < len(runs)
    result = {
        "workers": workers, "pipelines": pipelines,
        "wall_s": None if timed_out else round(wall, 1),
        "timed_out_after_s": round(wall, 1) if timed_out else None,
        "succeeded": sum(state == "success" for state in states.values()),
        "failed": sum(state == "failed" for state in states.values()),
        "run_s_mean": round(sum(durations) / len(durations), 1) if durations else None,
        "run_s_max": round(max(durations), 1) if durations else None,
        "replicas_used": replicas_used(stack, set(runs.values())),
        "loadavg_before": load_before, "loadavg_after": load_average(), "deploy": deploy,
    }
    common.log(f"workers={workers} pipelines={pipelines}: {result}")
    stop_deployments(stack)
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for workers in sorted({r["workers"] for r in results}):
        points = [(r["pipelines"], r["wall_s"]) for r in results
                  if r["workers"] == workers and r["wall_s"] is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o",
                      label=f"{workers} worker{'s' if workers > 1 else ''}")
    axis.set_xlabel("pipelines triggered at once")
    axis.set_ylabel("wall time until all runs end (s)")
    axis.set_title("Training DAGs on the compose stack (CeleryExecutor)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def publish(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Write results/scale_workers.{json,md,png} from the cases measured so far."""
    rows = [[r["workers"], r["pipelines"], r["wall_s"] if r["wall_s"] is not None
             else f"timeout ({r['timed_out_after_s']:.0f} s)", r["run_s_mean"], r["run_s_max"],
             f"{r['succeeded']}/{r['pipelines']}", r["replicas_used"], r["loadavg_before"]]
            for r in results]
    common.write_results(
        NAME, "Scale out: training DAGs at once on 1 and 3 Celery workers (compose stack)",
        {"cases": results, "concurrency_per_worker": args.concurrency,
         "case_timeout_s": args.case_timeout},
        [("", ["workers", "pipelines at once", "wall time (s)", "run mean (s)", "run max (s)",
               "succeeded", "workers used", "load average before"], rows)],
        notes=[f"Each worker has {args.concurrency} task slots (AIRFLOW_WORKER_CONCURRENCY); "
               "every run is the training DAG of a 1,000-customer spec, "
               + ("through containerize and deploy (a model image per pipeline)." if args.deploy
                  else "ingest to register (skip_deploy: true; `--deploy` runs containerize, "
                       "deploy and monitor too)."),
               "Wall time: from the first trigger to the last run's end, polled every 5 s.",
               "Noisy: the machine is shared; the load average (1, 5, 15 min) is recorded "
               "before each case."])
    plot(results, common.RESULTS_DIR / f"{NAME}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pipelines", type=parse_counts, default=PIPELINES)
    parser.add_argument("--workers", type=parse_counts, default=WORKERS)
    parser.add_argument("--concurrency", type=int, default=2, help="task slots per worker")
    parser.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT_S)
    parser.add_argument("--deploy", action="store_true",
                        help="run containerize, deploy and monitor too (no skip_deploy)")
    args = parser.parse_args()

    images = ensure_images()
    results: list[dict[str, Any]] = []
    stack = start_stack(images, pipelines=(), workers=args.workers[0],
                        concurrency=args.concurrency)
    try:
        for workers in args.workers:
            if len(stack.replica_ids(WORKER)) != workers:
                common.log(f"scaling to {workers} worker(s): "
                           f"{stack.scale_workers(workers):.0f} s")
            for pipelines in args.pipelines:
                results.append(run_case(stack, workers, pipelines, args.case_timeout,
                                        args.deploy))
                publish(results, args)  # after each case: an interrupted run keeps its cases
    finally:
        if os.environ.get("AIRMLOPS_COMPOSE_KEEP") != "1":
            stop_stack(stack)


if __name__ == "__main__":
    main()
