"""A real model service, shared by tests/integration/test_service.py and the serving attacks
of tests/security (test_http_limits.py, test_feedback.py, test_live_serving.py).

Features and a model trained and registered for a smaller copy of the
demo spec, its bento built from the registered version, and ``serve(name, **env)`` starting
``bentoml serve`` of it on a free loopback port (stopped at module end).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from airmlops.platform import free_port
from airmlops.serving.bento import BentoRef, build_bento, serve_command
from airmlops.settings import Settings
from airmlops.spec import PipelineSpec, load_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
AS_OF = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
WINDOW = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2100, 1, 1, tzinfo=dt.UTC))


@dataclasses.dataclass
class Model:
    spec: PipelineSpec
    spec_path: Path
    version: str
    tracking_uri: str
    data_root: Path
    settings: Settings
    known: list[str]


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from airmlops import stages
    from airmlops.features.online import SqliteOnlineStore

    root = tmp_path_factory.mktemp("service-model")
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    data["source"]["customers"] = 800
    data["feature_store"]["backfill_days"] = 40
    data["training"].update(min_rows=200)
    spec_path = root / "churn.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(spec_path)
    settings = Settings(data_root=root / "data", mlflow_tracking_uri=f"sqlite:///{root}/mlflow.db",
                        redis_url=None)
    run = stages.RunContext(dag_id="churn_training", run_id="service-test", as_of=AS_OF,
                            git_commit="0" * 40, trigger_reason="integration test")
    stages.build_features(spec, run, settings)
    stages.materialize_features(spec, run, settings)
    snapshot = stages.ingest(spec, run, settings)
    trained = stages.train(spec, stages.preprocess(spec, snapshot, settings), run, settings)
    registered = stages.register(spec, trained, settings)
    with SqliteOnlineStore(settings.data_root / "online" / "store.sqlite", spec.name) as store:
        ids = [f"C{i:06d}" for i in range(800)]
        known = [e for e in ids if not store.read(spec.feature_store.views, [e]).missing]
    assert len(known) > 100
    return Model(spec, spec_path, registered.version, settings.mlflow_tracking_uri,
                 settings.data_root, settings, known)


@pytest.fixture(scope="module")
def bento(model: Model, tmp_path_factory: pytest.TempPathFactory) -> tuple[BentoRef, Path]:
    home = tmp_path_factory.mktemp("bentoml-home")
    ref = build_bento(model.spec, model.version, model.tracking_uri, home,
                      spec_path=model.spec_path)
    return ref, home


def wait_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"bentoml serve exited ({server.process.returncode}):\n"
                        f"{server.log_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{server.url} not ready in {timeout} s:\n{server.log_text()[-4000:]}")


def stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def serve(model: Model, bento: tuple[BentoRef, Path], tmp_path_factory: pytest.TempPathFactory):
    """``serve(name, **env)`` starts the bento on a free loopback port; stopped at module end."""
    ref, home = bento
    logs = tmp_path_factory.mktemp("service-logs")
    started: list[Server] = []

    def start(name: str, **extra: str) -> Server:
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLOPS_SERVING_", "MLOPS_PREDICTION_LOG_"))
               and k != "MLOPS_REDIS_URL"}
        env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true",
                   MLOPS_DATA_ROOT=str(model.data_root), **extra)
        log_path = logs / f"{name}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(serve_command(ref.tag, port), env=env, cwd=logs,
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        server = Server(f"http://127.0.0.1:{port}", process, log_path)
        started.append(server)
        wait_ready(server)
        return server

    yield start
    for server in started:
        stop(server)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


__all__ = ["AS_OF", "WINDOW", "Model", "Server", "bento", "metric", "model", "serve"]

