"""The closed loop for real: a deployed champion, replayed traffic, a scheduler running the
monitoring DAG, and the retraining it triggers.

Setup (module fixture): a small copy of the demo spec without a feature store (every input
comes with the request, so replayed drift reaches the model), trained, registered, packaged
as a bento, deployed blue/green on a free port, baked and promoted to ``champion`` with its
reference data by the training stages themselves; meanwhile a platform (its own PostgreSQL,
Airflow's four components, the session's MLflow) starts on a DAGs folder that builds this
spec's DAGs, all paused at creation: only the monitoring DAG is unpaused, so a triggered
training run stays queued and does no work.

The test replays traffic window by window (short windows: each monitoring run is triggered
through the REST API with an explicit data interval) and lets the scheduler run the monitoring
DAG: stable windows decide "none", the first covariate-drift window reports the drift and
triggers exactly one training run (``retrain__<window_id>``) whose conf carries the reason, and
a second monitoring run of that same window triggers nothing more.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow_api import AirflowClient
from log_polling import wait_logged

from airmlops.platform import Platform, free_port, set_dag_paused, wait_for_dag
from airmlops.settings import PROJECT_ROOT, Settings
from airmlops.spec import PipelineSpec, load_spec

pytestmark = pytest.mark.integration

PIPELINE = "loopmon"
MONITORING = f"{PIPELINE}_monitoring"
TRAINING = f"{PIPELINE}_training"
WINDOW_SECONDS = 15
RATE = 10.0  # requests per second
BATCH = 5  # rows per request: ~750 rows a window
LABEL_DELAY = 2.0
RUN_TIMEOUT = 240.0
DAG_FILE = '''"""Airflow DAGs of the test spec, and its monitoring DAG until the factory has it."""
from airmlops.dags import build_all
from airmlops.dags.monitoring import build_monitoring_dag
from airmlops.settings import get_settings
from airmlops.spec import load_spec, spec_paths

_dags = build_all()
for _path in spec_paths(get_settings().pipelines_dir):
    _spec = load_spec(_path)
    if f"{_spec.name}_monitoring" not in _dags:
        _dags[f"{_spec.name}_monitoring"] = build_monitoring_dag(_spec, _path)
for _dag_id, _dag in _dags.items():
    globals()[_dag_id] = _dag
'''


def _test_spec(port: int) -> dict[str, Any]:
    data = yaml.safe_load((PROJECT_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    data.pop("feature_store")
    data.update(
        name=PIPELINE, schedule=None, tags=["test"],
        description="A small demo copy without a feature store, for the monitoring loop test.",
        training={"window_days": 90, "test_fraction": 0.3, "gap_days": 0, "min_rows": 200},
        gates={"primary_metric": "roc_auc", "thresholds": {"roc_auc": 0.6}},
        deploy={"target": "process", "port": port, "bake_seconds": 1, "smoke_requests": 3,
                "ready_timeout_seconds": 180},
        monitoring={
            "schedule": "0 0 1 1 *",  # never during the test: every run is triggered by it
            "window_minutes": 5, "sample_size": 300, "reference_sample_size": 1000,
            "strata": 4, "min_rows": 100,
            # On 300-row samples of this 700-customer world, stable windows score at most
            # ~0.18 (normed Wasserstein) and covariate drift moves sessions to ~0.43 (>= 0.37).
            "drift": {"default": {"numeric": {"method": "wasserstein", "threshold": 0.2}},
                      "columns": {"sessions": {"critical": True}}},
            "performance": {"metric": "roc_auc", "min": 0.55, "min_labels": 50},
            "policy": {"k": 1, "n": 1, "cooldown_hours": 1, "max_drift_share": 0.3},
        },
    )
    data["source"].update(customers=700, seed=11)
    return data


@dataclass
class Loop:
    spec: PipelineSpec
    settings: Settings
    platform: Platform
    airflow: AirflowClient
    stable_url: str
    champion: str
    timings: dict[str, float]


def _deploy_champion(spec: PipelineSpec, spec_path: Path, settings: Settings,
                     as_of: dt.datetime) -> tuple[str, str, dict[str, float]]:
    """The training stages up to a baked champion with its reference data (no Airflow)."""
    from airmlops import stages

    timings: dict[str, float] = {}
    run = stages.RunContext(dag_id=TRAINING, run_id="loop-champion", as_of=as_of,
                            git_commit="0" * 40, trigger_reason="integration test champion")
    clock = time.monotonic()
    snapshot = stages.ingest(spec, run, settings)
    trained = stages.train(spec, stages.preprocess(spec, snapshot, settings), run, settings)
    registered = stages.register(spec, trained, settings)
    timings["train"] = time.monotonic() - clock
    clock = time.monotonic()
    packaged = stages.containerize(spec, str(spec_path), registered, settings)
    timings["bento"] = time.monotonic() - clock
    clock = time.monotonic()
    deployed = stages.deploy(spec, packaged, trained, run, settings)
    monitored = stages.monitor(spec, deployed, trained, run, settings)
    timings["deploy_and_bake"] = time.monotonic() - clock
    assert Path(monitored.reference).is_dir()
    return deployed.stable_url, registered.version, timings


@pytest.fixture(scope="module")
def loop(platform_factory, mlflow_server: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from airmlops.serving.deploy import undeploy

    root = tmp_path_factory.mktemp("monitoring-loop")
    dags, pipelines, data_root = root / "dags", root / "pipelines", root / "data"
    dags.mkdir()
    pipelines.mkdir()
    (dags / "loop_pipelines.py").write_text(DAG_FILE)
    spec_path = pipelines / f"{PIPELINE}.yaml"
    spec_path.write_text(yaml.safe_dump(_test_spec(free_port()), sort_keys=False))
    spec = load_spec(spec_path)
    settings = Settings(data_root=data_root, mlflow_tracking_uri=mlflow_server, redis_url=None,
                        pipelines_dir=pipelines, git_commit="0" * 40)
    as_of = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as env:
        # The platform's processes (hence every task) inherit these.
        env.setenv("MLOPS_DATA_ROOT", str(data_root))
        env.setenv("MLOPS_PIPELINES_DIR", str(pipelines))
        env.setenv("MLOPS_GIT_COMMIT", "0" * 40)
        env.delenv("MLOPS_REDIS_URL", raising=False)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            starting = pool.submit(platform_factory, "monitoring", dags,
                                   dags_paused_at_creation=True)
            try:
                stable_url, champion, timings = _deploy_champion(spec, spec_path, settings,
                                                                 as_of)
            finally:
                platform = starting.result()
    try:
        timings["platform_and_champion"] = time.monotonic() - started
        airflow = AirflowClient.for_platform(platform)
        for dag_id in (MONITORING, TRAINING):
            wait_for_dag(platform.base_url, airflow.token, dag_id, timeout=240)
        set_dag_paused(platform.base_url, airflow.token, MONITORING, paused=False)
        timings["setup"] = time.monotonic() - started
        yield Loop(spec, settings, platform, airflow, stable_url, champion, timings)
    finally:
        undeploy(PIPELINE, data_root)


def _replay_window(loop: Loop, scenario: str, start: dt.datetime, seed: int):
    """Replay one window of traffic from ``start``; return its whole-second end and result."""
    from airmlops.monitoring.replay import replay

    while dt.datetime.now(dt.UTC) < start:
        time.sleep(0.05)
    result = replay(loop.stable_url, loop.spec, scenario, rows=10_000, rate=RATE,
                    batch_size=BATCH, label_delay=LABEL_DELAY, day=start.date(), days=28,
                    max_seconds=WINDOW_SECONDS - 1.5, seed=seed)
    assert result.errors == 0, result.error_samples
    wait_logged(PIPELINE, start, result.rows_answered, loop.settings)
    now = dt.datetime.now(dt.UTC)
    end = now.replace(microsecond=0) + dt.timedelta(seconds=1)
    return end, result


def test_drift_triggers_exactly_one_retraining_and_a_repeated_window_none(loop: Loop):
    from mlflow import MlflowClient

    from airmlops.monitoring.store import MonitoringStore
    from airmlops.monitoring.tasks import window_id_for

    print(f"\n[loop] setup timings: { {k: round(v, 1) for k, v in loop.timings.items()} }")
    test_started = time.monotonic()
    plan = [("stable", "w0"), ("stable", "w1"), ("stable", "w2"), ("covariate_drift", "w3")]
    windows: dict[str, tuple[dt.datetime, dt.datetime]] = {}
    replays = {}
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
    for seed, (scenario, run_id) in enumerate(plan):
        end, replays[run_id] = _replay_window(loop, scenario, start, seed)
        windows[run_id] = (start, end)
        # The scheduler runs it while the next window plays.
        loop.airflow.trigger(MONITORING, run_id, start, end)
        start = end
    assert all(r.model_versions == {loop.champion: r.rows_answered} for r in replays.values())
    print(f"[loop] replayed {sum(r.rows_answered for r in replays.values())} rows in "
          f"{len(plan)} windows, {sum(r.labels_posted for r in replays.values())} labels")

    durations = {run_id: loop.airflow.wait(MONITORING, run_id, timeout=RUN_TIMEOUT)
                 for _, run_id in plan}
    print(f"[loop] monitoring runs finished (waits, s): "
          f"{ {k: round(v, 1) for k, v in durations.items()} }")

    store = MonitoringStore(loop.settings.data_root)
    ids = {run_id: window_id_for(*bounds) for run_id, bounds in windows.items()}
    for run_id in ("w0", "w1", "w2"):
        decision = loop.airflow.xcom(MONITORING, run_id, "decide")
        row = store.window(PIPELINE, ids[run_id])
        assert decision["action"] == "none", (run_id, decision, row["columns"])
        assert row["decision"] == "none" and row["reason"] == decision["reason"]
        assert "not breached" in row["reason"]
        assert row["breaches"] == [] and row["rows"] >= 300 and row["sampled"] == 300
        assert loop.airflow.task_states(MONITORING, run_id)["act"] == "skipped"
    # Labels of earlier requests arrived in later windows and were scored there.
    later = store.window(PIPELINE, ids["w2"])
    assert later["label_count"] >= 50 and later["performance"]["roc_auc"] > 0.6

    drifted = store.window(PIPELINE, ids["w3"])
    print(f"[loop] drift window: breaches {drifted['breaches']}, drift share "
          f"{drifted['drift_share']:.2f}, scores "
          f"{ {k: round(v['score'], 2) for k, v in drifted['columns'].items()} }")
    assert "feature:sessions" in drifted["breaches"], drifted["columns"]
    assert drifted["columns"]["sessions"]["score"] > 0.3
    assert drifted["drift_share"] >= 2 / 9  # sessions and minutes watched at least
    assert drifted["decision"] == "retrain" and drifted["dedup_key"] == f"retrain__{ids['w3']}"
    assert Path(drifted["html_path"]).is_file()
    assert drifted["html_path"].endswith(f"reports/{PIPELINE}/monitoring/{ids['w3']}.html")
    decision = loop.airflow.xcom(MONITORING, "w3", "decide")
    assert decision["action"] == "retrain" and decision["active_retrainings"] == 0
    took = loop.airflow.durations(MONITORING, "w3")
    print(f"[loop] task durations of the drift window's run (s): {took}")

    runs = loop.airflow.runs(TRAINING)
    assert [r["dag_run_id"] for r in runs] == [f"retrain__{ids['w3']}"]
    triggered = runs[0]
    assert triggered["state"] == "queued"  # the training DAG is paused: it does no work here
    assert triggered["conf"]["triggered_by"] == "monitoring"
    assert triggered["conf"]["monitoring_window"] == ids["w3"]
    # The retraining reads data up to the end of the window that triggered it.
    assert triggered["conf"]["data_end"] == windows["w3"][1].isoformat()
    reason = triggered["conf"]["trigger_reason"]
    assert reason.startswith(f"monitoring of {PIPELINE}, window {ids['w3']}: ")
    assert "feature:sessions" in reason and len(reason) <= 500
    assert loop.airflow.task_states(MONITORING, "w3")["act"] == "success"
    # Nothing old enough to delete yet.
    assert loop.airflow.task_states(MONITORING, "w3")["retain"] == "success"
    assert Path(loop.airflow.xcom(MONITORING, "w3", "collect")["predictions_path"]).is_file()

    # The same window monitored again (another run, same data interval): no second trigger.
    start, end = windows["w3"]
    loop.airflow.trigger(MONITORING, "w3-again", start, end,
                         logical_date=end + dt.timedelta(seconds=1))
    loop.airflow.wait(MONITORING, "w3-again", timeout=RUN_TIMEOUT)
    again = loop.airflow.xcom(MONITORING, "w3-again", "decide")
    assert again["action"] == "retrain" and again["replayed"] is True
    assert again["trigger_run_id"] == f"retrain__{ids['w3']}"
    assert loop.airflow.task_states(MONITORING, "w3-again")["act"] == "skipped"
    assert [r["dag_run_id"] for r in loop.airflow.runs(TRAINING)] == [f"retrain__{ids['w3']}"]
    assert store.count(PIPELINE) == 4

    # Each window's numbers are in MLflow, with where its HTML report is.
    client = MlflowClient(tracking_uri=loop.settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(f"{PIPELINE}-monitoring")
    found = client.search_runs([experiment.experiment_id], max_results=50)
    by_window = {run.data.tags["window_id"]: run for run in found}
    assert set(by_window) == set(ids.values())  # the repeated run updated its window's run
    logged = by_window[ids["w3"]]
    assert logged.data.metrics["drift.sessions"] == drifted["columns"]["sessions"]["score"]
    assert logged.data.tags["report_html"] == drifted["html_path"]
    assert logged.data.tags["champion_version"] == loop.champion
    print(f"[loop] test body {time.monotonic() - test_started:.0f} s; setup "
          f"{loop.timings['setup']:.0f} s")
