"""The closed loop on a user's own files, for real: no simulator source, a boolean feature,
traffic replayed with ``airmlops replay --file``, one retraining with refit.

The data: the simulator's drifting world written out once as CSV files, as a user would have
them: ``history.csv`` (110 days) and ten weekly labelled batches (``batch_01.csv`` ...), the
subscription business shifting (``covariate_and_concept_drift``) from the first day of the sixth
batch. A boolean column ``had_payment_failure`` (``True``/``False`` in the CSV) is a feature of
``type: boolean``. The pipeline's spec reads ``source: {kind: file, path: own_churn/*.csv}``; a
batch file appears in that folder when its week is played.

Setup (module fixture): a platform (its own PostgreSQL, Airflow's four components, the session's
MLflow) on the repository's ``dags/`` folder with this spec as the only pipeline, DAGs paused at
creation; meanwhile the training stages deploy a champion trained on ``history.csv`` only (the
first training of a pipeline does not refit).

The test then plays the weeks, one short monitoring window each (a window is the wall-clock
interval in which its batch was replayed; each monitoring run is triggered through the REST API
and run by the scheduler):

1. batches 1-5 (stable): no breach;
2. batch 6 (the drift's first week) breaches, the policy (2 of the last 3 windows) waits;
   batch 7 breaches again and triggers ``own_churn_training`` once;
3. the retraining reads every file then in the folder (history and batches 1-7), is blessed by
   the gates on its held-out rows and refit on all of them (``training.refit`` is on for
   retraining runs), deployed and promoted;
4. batches 8-10, sent to the stable address, are scored by the refit champion: its ROC AUC
   there (computed from what the clients got back) is within 0.002 of a model trained offline
   on every row up to the retraining with the same estimator.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from airflow_api import AirflowClient
from log_polling import wait_logged

from airmlops.platform import Platform, free_port, set_dag_paused, wait_for_dag
from airmlops.settings import PROJECT_ROOT, Settings
from airmlops.spec import PipelineSpec, load_spec

pytestmark = pytest.mark.e2e

PIPELINE = "own_churn"
TRAINING = f"{PIPELINE}_training"
MONITORING = f"{PIPELINE}_monitoring"
HISTORY_DAYS = 110
BATCHES = 10
BATCH_DAYS = 7
DRIFT_BATCH = 6
"""The first batch of the drifted world (1-based)."""
RETRAIN_BATCH = DRIFT_BATCH + 1
"""The batch whose window makes the policy retrain (2 breaching windows of the last 3)."""
SHIFT = "covariate_and_concept_drift"
CUSTOMERS = 1000
RATE, BATCH_ROWS, LABEL_DELAY = 100.0, 20, 0.3
RUN_TIMEOUT = 300.0
TRAINING_TIMEOUT = 600.0
AIRMLOPS = str(Path(sys.executable).with_name("airmlops"))
NUMERIC = ["age", "tenure_days", "monthly_fee", "sessions", "minutes_watched",
           "support_tickets", "payment_failures"]


def _log(message: str, started: float | None = None) -> None:
    stamp = f" (+{time.monotonic() - started:.0f} s)" if started is not None else ""
    print(f"[own-data-loop]{stamp} {message}", flush=True)


def _write_world(folder: Path, today: dt.date) -> tuple[Path, list[Path]]:
    """The simulator's drifting world as a user's CSV files: (history, weekly batches), the
    batches written aside in ``folder`` (they are moved into the source folder one by one)."""
    from airmlops.data.simulator import simulate_observations
    from airmlops.spec import SimulatorSource

    first_batch = today - dt.timedelta(days=BATCHES * BATCH_DAYS)
    drift_start = first_batch + dt.timedelta(days=(DRIFT_BATCH - 1) * BATCH_DAYS)
    world = SimulatorSource(kind="simulator", customers=CUSTOMERS, scenario=SHIFT,
                            scenario_start=drift_start)
    frame = simulate_observations(world, first_batch - dt.timedelta(days=HISTORY_DAYS), today)
    frame["had_payment_failure"] = frame["payment_failures"] > 0  # written as True/False
    frame["event_timestamp"] = frame["event_timestamp"].map(lambda t: t.isoformat())
    days = frame["event_timestamp"].str.slice(0, 10).map(dt.date.fromisoformat)
    folder.mkdir(parents=True)
    history = folder / "history.csv"
    frame[days < first_batch].to_csv(history, index=False)
    batches = []
    for number in range(1, BATCHES + 1):
        begins = first_batch + dt.timedelta(days=(number - 1) * BATCH_DAYS)
        rows = frame[(days >= begins) & (days < begins + dt.timedelta(days=BATCH_DAYS))]
        path = folder / f"batch_{number:02d}.csv"
        rows.to_csv(path, index=False)
        batches.append(path)
    return history, batches


def _spec(port: int, source_glob: str) -> dict[str, Any]:
    """A spec as a user writes it for these files (no feature store: requests carry every
    feature), deployed as a local process on ``port``."""
    return {
        "name": PIPELINE, "description": "Churn from the user's own CSV files.",
        "owner": "mlops", "schedule": None, "start_date": "2026-01-01",
        "task": "binary_classification", "tags": ["test", "own-data"],
        "source": {"kind": "file", "path": source_glob, "format": "csv"},
        "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
        "features": [
            {"name": "plan", "type": "categorical", "values": ["basic", "standard", "premium"]},
            {"name": "region", "type": "categorical",
             "values": ["north", "south", "east", "west"]},
            {"name": "age", "type": "numeric", "min": 18, "max": 100},
            {"name": "tenure_days", "type": "numeric", "min": 0, "max": 3650},
            {"name": "monthly_fee", "type": "numeric", "min": 0, "max": 500},
            {"name": "sessions", "type": "numeric", "min": 0, "max": 200},
            {"name": "minutes_watched", "type": "numeric", "min": 0, "max": 1440,
             "max_null_fraction": 0.05},
            {"name": "support_tickets", "type": "numeric", "min": 0, "max": 50},
            {"name": "payment_failures", "type": "numeric", "min": 0, "max": 20},
            {"name": "had_payment_failure", "type": "boolean"},
        ],
        # Every row up to the retraining is in its window; refit follows the default (on for
        # retraining runs).
        "training": {"window_days": 3650, "test_fraction": 0.2, "gap_days": 0,
                     "min_rows": 1000},
        "estimator": {"class_path": "sklearn.linear_model.LogisticRegression",
                      "params": {"C": 1.0, "max_iter": 1000}, "seed": 42},
        "deploy": {"target": "process", "port": port, "bake_seconds": 3, "smoke_requests": 3,
                   "ready_timeout_seconds": 180},
        # The challenger is trained before the drift and judged on drifted held-out rows, where
        # it is as good as the champion (not better): the gate tolerates that, refit adds the
        # drifted rows.
        "gates": {"primary_metric": "roc_auc", "thresholds": {"roc_auc": 0.65},
                  "champion": {"max_regression": 0.03, "confidence": 0.95,
                               "n_bootstrap": 1000}},
        "monitoring": {
            "schedule": "0 0 1 1 *",  # never during the test: every run is triggered by it
            "window_minutes": 5, "sample_size": 500, "reference_sample_size": 1000,
            "strata": 4, "min_rows": 100, "retention_windows": 48,
            "drift": {"default": {"numeric": {"method": "wasserstein", "threshold": 0.2}},
                      "columns": {"sessions": {"critical": True}}},
            "performance": {"metric": "roc_auc", "min": 0.6, "min_labels": 100,
                            "label_lookback_windows": 24},
            "policy": {"k": 2, "n": 3, "cooldown_hours": 24, "max_drift_share": 0.3},
        },
    }


@dataclass
class Loop:
    spec: PipelineSpec
    spec_path: Path
    settings: Settings
    platform: Platform
    airflow: AirflowClient
    stable_url: str
    champion: str
    source: Path
    batches: list[Path]
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


def _deploy_champion(spec: PipelineSpec, spec_path: Path, settings: Settings,
                     data_end: dt.datetime) -> tuple[str, str]:
    """The first model, trained on ``history.csv`` by the training stages themselves."""
    from airmlops import stages

    run = stages.RunContext(dag_id=TRAINING, run_id="first-model", as_of=data_end,
                            data_end=data_end, git_commit="0" * 40,
                            trigger_reason="e2e first model")
    snapshot = stages.ingest(spec, run, settings)
    training_set = stages.preprocess(spec, snapshot, settings)
    trained = stages.train(spec, training_set, run, settings)
    registered = stages.register(spec, trained, settings)
    packaged = stages.containerize(spec, str(spec_path), registered, settings)
    deployed = stages.deploy(spec, packaged, trained, run, settings)
    stages.monitor(spec, deployed, trained, run, settings)
    return deployed.stable_url, registered.version


@pytest.fixture(scope="module")
def loop(platform_factory, mlflow_server: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from airmlops.serving.deploy import undeploy

    started = time.monotonic()
    root = tmp_path_factory.mktemp("own-data-loop")
    pipelines, data_root = root / "pipelines", root / "data"
    pipelines.mkdir()
    today = dt.datetime.now(dt.UTC).date()
    history, batches = _write_world(root / "arriving", today)
    source = data_root / PIPELINE
    source.mkdir(parents=True)
    history.rename(source / history.name)
    spec_path = pipelines / f"{PIPELINE}.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(free_port(), f"{PIPELINE}/*.csv"),
                                        sort_keys=False))
    spec = load_spec(spec_path, data_roots=[data_root])
    settings = Settings(data_root=data_root, mlflow_tracking_uri=mlflow_server, redis_url=None,
                        pipelines_dir=pipelines, git_commit="0" * 40)
    first_batch = today - dt.timedelta(days=BATCHES * BATCH_DAYS)
    history_end = dt.datetime.combine(first_batch, dt.time(), tzinfo=dt.UTC)
    env = {k: v for k, v in os.environ.items() if k != "MLOPS_REDIS_URL"}
    env.update(MLOPS_DATA_ROOT=str(data_root), MLOPS_PIPELINES_DIR=str(pipelines),
               MLOPS_GIT_COMMIT="0" * 40, MLOPS_MLFLOW_TRACKING_URI=mlflow_server)
    with pytest.MonkeyPatch.context() as patch:
        # The platform's processes (hence every task) inherit these.
        for name in ("MLOPS_DATA_ROOT", "MLOPS_PIPELINES_DIR", "MLOPS_GIT_COMMIT"):
            patch.setenv(name, env[name])
        patch.delenv("MLOPS_REDIS_URL", raising=False)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            starting = pool.submit(platform_factory, "own-data-loop", PROJECT_ROOT / "dags",
                                   dags_paused_at_creation=True)
            try:
                stable_url, champion = _deploy_champion(spec, spec_path, settings, history_end)
            finally:
                platform = starting.result()
    _log(f"platform up and champion v{champion} (history only) serving at {stable_url}",
         started)
    try:
        airflow = AirflowClient.for_platform(platform, progress=_log)
        for dag_id in (MONITORING, TRAINING):
            wait_for_dag(platform.base_url, airflow.token, dag_id, timeout=240)
            set_dag_paused(platform.base_url, airflow.token, dag_id, paused=False)
        yield Loop(spec, spec_path, settings, platform, airflow, stable_url, champion, source,
                   batches, env, {"setup": time.monotonic() - started})
    finally:
        undeploy(PIPELINE, data_root)


def _replay_file(loop: Loop, path: Path, *extra: str) -> dict[str, Any]:
    """``airmlops replay --file`` as a user runs it; its JSON result."""
    command = [AIRMLOPS, "replay", "--spec", str(loop.spec_path), "--url", loop.stable_url,
               "--file", str(path), "--rate", str(RATE), "--batch", str(BATCH_ROWS),
               "--label-delay", str(LABEL_DELAY), "--max-seconds", "120", *extra]
    done = subprocess.run(command, env=loop.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout)


def _play_week(loop: Loop, number: int, windows: dict[int, tuple[dt.datetime, dt.datetime]]
               ) -> None:
    """Batch ``number`` arrives in the source folder, its rows are replayed to the stable
    address (labels after a short delay) in a window of their own, and the window is
    monitored by the scheduler."""
    batch = loop.batches[number - 1]
    batch.rename(loop.source / batch.name)
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
    while dt.datetime.now(dt.UTC) < start:
        time.sleep(0.05)
    result = _replay_file(loop, loop.source / batch.name)
    assert result["errors"] == 0 and result["labels_dropped"] == 0, result
    assert result["rows_answered"] == result["rows_sent"] > 0, result
    wait_logged(PIPELINE, start, result["rows_answered"], loop.settings)
    end = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
    while dt.datetime.now(dt.UTC) < end:
        time.sleep(0.05)
    windows[number] = (start, end)
    loop.airflow.trigger(MONITORING, f"week{number:02d}", start, end)
    _log(f"week {number}: {result['rows_answered']} rows, versions "
         f"{result['model_versions']}, {result['labels_posted']} labels")


def _scores_from_the_stable_address(loop: Loop, frame) -> list[float]:
    """What clients get back for ``frame``'s rows: the positive-class probabilities."""
    from airmlops.monitoring.replay import request_instances

    instances = request_instances(loop.spec, frame)
    probabilities: list[float] = []
    with httpx.Client(base_url=loop.stable_url, timeout=30) as client:
        for offset in range(0, len(instances), 100):
            answer = client.post("/predict", json={"instances": instances[offset:offset + 100]})
            assert answer.status_code == 200, answer.text
            probabilities += [p["probability"] for p in answer.json()["predictions"]]
    return probabilities


def _offline_model(spec: PipelineSpec, frame):
    """The spec's estimator fitted offline on ``frame`` by the platform's own pipeline."""
    from airmlops.spec import resolve_estimator
    from airmlops.training.model import build_pipeline, feature_frame, label_array

    model = build_pipeline(spec, resolve_estimator(spec))
    return model.fit(feature_frame(spec, frame), label_array(spec, frame))


def test_own_files_drift_retrain_with_refit_and_the_new_champion_serves(loop: Loop):
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.metrics import roc_auc_score

    from airmlops.monitoring.store import MonitoringStore
    from airmlops.monitoring.tasks import window_id_for
    from airmlops.training.model import predict_scores

    started = time.monotonic()
    _log(f"setup {loop.timings['setup']:.0f} s")
    store = MonitoringStore(loop.settings.data_root)
    windows: dict[int, tuple[dt.datetime, dt.datetime]] = {}

    # A dry run validates a file against the live service and logs nothing.
    dry = _replay_file(loop, loop.batches[0], "--dry-run")
    assert dry["dry_run"] is True and dry["invalid_rows"] == 0, dry

    for number in range(1, RETRAIN_BATCH + 1):
        _play_week(loop, number, windows)
    ids = {number: window_id_for(*bounds) for number, bounds in windows.items()}
    rows: dict[int, dict[str, Any]] = {}
    for number in windows:
        took = loop.airflow.wait(MONITORING, f"week{number:02d}", timeout=RUN_TIMEOUT)
        rows[number] = store.window(PIPELINE, ids[number])
        _log(f"monitoring of week {number} ({took:.0f} s wait): breaches "
             f"{rows[number]['breaches']}, {rows[number]['decision']}: "
             f"{rows[number]['reason']}", started)

    # 1. The stable weeks: no breach, nothing triggered. The replay's dry run and the
    # deploy's smoke requests and probes are not in any window.
    for number in range(1, DRIFT_BATCH):
        assert rows[number]["breaches"] == [] and rows[number]["decision"] == "none", (
            number, rows[number]["columns"])
        assert rows[number]["rows"] == pd.read_csv(loop.source / f"batch_{number:02d}.csv")\
            .shape[0], rows[number]
    # 2. The drift is caught within two windows, and the second breach retrains.
    first_breach = min(n for n in windows if rows[n]["breaches"])
    assert DRIFT_BATCH <= first_breach <= DRIFT_BATCH + 1, first_breach
    assert rows[RETRAIN_BATCH]["decision"] == "retrain", rows[RETRAIN_BATCH]
    retrain_id = f"retrain__{ids[RETRAIN_BATCH]}"
    assert [r["dag_run_id"] for r in loop.airflow.runs(TRAINING)] == [retrain_id]

    # 3. The retraining: every file in the folder then, blessed on held-out rows, refit.
    took = loop.airflow.wait(TRAINING, retrain_id, timeout=TRAINING_TIMEOUT)
    _log(f"retraining done in {took:.0f} s; task durations (s): "
         f"{loop.airflow.durations(TRAINING, retrain_id)}", started)
    assert set(loop.airflow.task_states(TRAINING, retrain_id).values()) == {"success"}
    assert [r["dag_run_id"] for r in loop.airflow.runs(TRAINING)] == [retrain_id]
    registered = loop.airflow.xcom(TRAINING, retrain_id, "register")
    new_version = registered["version"]
    assert int(new_version) == int(loop.champion) + 1
    client = MlflowClient(tracking_uri=loop.settings.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias(PIPELINE, "champion")
    assert champion.version == new_version
    run = client.get_run(champion.run_id)
    assert run.data.tags["gate_blessed"] == "true"
    assert run.data.tags.get("refit") == "true", run.data.tags

    seen = pd.concat([pd.read_csv(path) for path in sorted(loop.source.glob("*.csv"))])
    seen["event_timestamp"] = pd.to_datetime(seen["event_timestamp"], utc=True)
    data_end = pd.Timestamp(loop.airflow.run(TRAINING, retrain_id)["conf"]["data_end"])
    seen = seen[seen["event_timestamp"] < data_end].sort_values("event_timestamp")
    assert int(run.data.tags["refit.rows"]) == len(seen), (run.data.tags, len(seen))

    # 4. The weeks after: the refit champion serves, as good as a model trained offline on
    # every row up to the retraining.
    later = pd.concat([pd.read_csv(path) for path in loop.batches[RETRAIN_BATCH:]])
    served = _scores_from_the_stable_address(loop, later)
    offline = predict_scores(loop.spec, _offline_model(loop.spec, seen),
                             _features(loop.spec, later))
    served_auc = roc_auc_score(later["churned"], served)
    offline_auc = roc_auc_score(later["churned"], offline)
    _log(f"ROC AUC on weeks {RETRAIN_BATCH + 1}-{BATCHES}: refit champion v{new_version} "
         f"{served_auc:.4f}, offline on all rows {offline_auc:.4f}; test body "
         f"{time.monotonic() - started:.0f} s", started)
    assert abs(served_auc - offline_auc) <= 0.002
    from airmlops.monitoring.replay import request_instances

    instance = {**request_instances(loop.spec, later.iloc[:1])[0], "had_payment_failure": True}
    answer = httpx.post(f"{loop.stable_url}/predict", timeout=10,
                        json={"instances": [instance]})  # a JSON boolean
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == new_version


def _features(spec: PipelineSpec, frame):
    from airmlops.training.model import feature_frame

    return feature_frame(spec, frame)
