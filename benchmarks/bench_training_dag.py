"""Benchmark 5: the demo training DAG from trigger to deployed, task by task.

``airflow dags test churn_training <date>`` in a fresh Airflow home (SQLite, LocalExecutor) with
the repository's DAGs, against an MLflow server this script starts (the platform's own
``start_mlflow`` on an embedded PostgreSQL), on the embedded defaults: features, online store
and prediction log on SQLite, the model deployed as a local process behind its proxy (the demo
spec, with the stable address moved to a free port). Every task runs: ingest, validate_data,
preprocess, train, validate_model, register, should_deploy, containerize, deploy, monitor (the
bake period included).

Each task's time comes from its task instance (``airflow tasks states-for-dag-run``: start and
end dates); Airflow's overhead = the wall time of ``dags test`` minus the sum of task times
(process start, DAG parsing, scheduling between tasks, XCom). Trigger to deployed = the end of
the ``deploy`` task minus the start of ``dags test``.

Run: ``.venv/bin/python benchmarks/bench_training_dag.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DAG_ID = "churn_training"
LOGICAL_DATE = "2026-06-01T00:00:00+00:00"
AIRFLOW = str(Path(common.PYTHON).with_name("airflow"))


def cli_json(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    done = subprocess.run([AIRFLOW, *args, "-o", "json"], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("[{") or line.strip() == "[]":
            return json.loads(line)
    raise RuntimeError(f"no JSON rows in `airflow {' '.join(args)}`: {done.stdout[-2000:]}")


def parse_time(text: str) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    import yaml

    from airmlops.embedded_pg import running_postgres, start_postgres, stop_postgres
    from airmlops.platform import MLFLOW, PlatformConfig, start_mlflow, stop_components, wait_mlflow
    from airmlops.serving import deploy as deployer

    run_dir = common.WORK_DIR / "dag"
    if running_postgres(run_dir) is not None:
        stop_postgres(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data_root = run_dir / "data"
    setup: dict[str, float] = {}
    results: dict[str, Any] = {"dag_id": DAG_ID, "logical_date": LOGICAL_DATE}
    try:
        began = time.perf_counter()
        pg = start_postgres(run_dir, databases=("mlflow",))
        config = PlatformConfig(run_dir=run_dir, dags_folder=common.REPO_ROOT / "dags",
                                plugins_folder=common.REPO_ROOT / "plugins",
                                mlflow_artifacts_dir=run_dir / "mlflow-artifacts",
                                mlflow_port=common.free_port())
        start_mlflow(config, pg)
        wait_mlflow(config, timeout=240.0, progress=common.log)
        setup["postgres_and_mlflow_s"] = time.perf_counter() - began

        spec = yaml.safe_load((common.REPO_ROOT / "include" / "pipelines" / "churn.yaml")
                              .read_text())
        spec["deploy"]["port"] = common.free_port()  # never the demo's 8600 of a live platform
        pipelines = run_dir / "pipelines"
        pipelines.mkdir()
        (pipelines / "churn.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        home = run_dir / "airflow-home"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW__", "MLOPS_", "MLFLOW_"))}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(common.REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "MLOPS_DATA_ROOT": str(data_root),
            "MLOPS_PIPELINES_DIR": str(pipelines),
            "MLOPS_MLFLOW_TRACKING_URI": config.mlflow_url,
            "MLFLOW_TRACKING_URI": config.mlflow_url,
            "MLOPS_GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567",
        })
        began = time.perf_counter()
        subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True,
                       timeout=600)
        setup["airflow_db_migrate_s"] = time.perf_counter() - began
        common.log(f"platform ready: {setup}")

        triggered = dt.datetime.now(dt.UTC)
        began = time.perf_counter()
        done = subprocess.run([AIRFLOW, "dags", "test", DAG_ID, LOGICAL_DATE, "--conf",
                               json.dumps({"trigger_reason": "benchmark"})],
                              env=env, capture_output=True, text=True, timeout=1500, cwd=run_dir)
        wall = time.perf_counter() - began
        (run_dir / "dags-test.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"dags test failed ({done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-5000:]}")
        runs = cli_json(env, "dags", "list-runs", DAG_ID)
        run_id = runs[0]["run_id"]
        tasks = cli_json(env, "tasks", "states-for-dag-run", DAG_ID, run_id)
        rows = []
        for task in tasks:
            start, end = parse_time(task.get("start_date", "")), parse_time(task.get("end_date",
                                                                                    ""))
            seconds = (end - start).total_seconds() if start and end else 0.0
            rows.append({"task_id": task["task_id"], "state": task["state"], "start": start,
                         "end": end, "seconds": seconds})
        rows.sort(key=lambda r: r["start"] or dt.datetime.max.replace(tzinfo=dt.UTC))
        busy = sum(r["seconds"] for r in rows)
        deploy_end = next((r["end"] for r in rows if r["task_id"] == "deploy"), None)
        results.update(setup=setup, wall_s=wall, tasks_s=busy, overhead_s=wall - busy,
                       trigger_to_deployed_s=(deploy_end - triggered).total_seconds()
                       if deploy_end else None,
                       tasks=[{**r, "start": str(r["start"]), "end": str(r["end"])}
                              for r in rows], bake_seconds=spec["deploy"]["bake_seconds"])
    finally:
        try:
            deployer.undeploy("churn", data_root)
        except Exception as error:
            common.log(f"undeploy: {error}")
        stop_components(run_dir, [MLFLOW])
        stop_postgres(run_dir)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    table = [[r["task_id"], r["state"], r["seconds"], f"{r['seconds'] / results['wall_s']:.0%}"]
             for r in results["tasks"]]
    table.append(["(sum of tasks)", "", results["tasks_s"],
                  f"{results['tasks_s'] / results['wall_s']:.0%}"])
    table.append(["Airflow overhead (wall - sum)", "", results["overhead_s"],
                  f"{results['overhead_s'] / results['wall_s']:.0%}"])
    table.append(["wall: `airflow dags test`", "", results["wall_s"], "100%"])
    common.write_results(
        "training_dag", "5. The demo training DAG, trigger to deployed", results,
        [("", ["task", "state", "seconds", "share of wall"], table),
         ("", ["measure", "seconds"],
          [["trigger to deployed (end of the deploy task)", results["trigger_to_deployed_s"]],
           ["trigger to done (bake and champion promotion included)", results["wall_s"]],
           ["setup: embedded PostgreSQL + MLflow server", setup["postgres_and_mlflow_s"]],
           ["setup: airflow db migrate (SQLite)", setup["airflow_db_migrate_s"]]])],
        notes=["`airflow dags test` in a fresh Airflow home (SQLite), embedded defaults (SQLite "
               "online store and prediction log, the bento served as a local process behind "
               f"its proxy); the monitor task bakes for {results['bake_seconds']} s by spec."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
