"""Fixtures of the fault-injection suite: a real deployment under test and the results table.

``deployment`` deploys the test model's bento (:mod:`model_service_fixtures`) through
:func:`airmlops.serving.deploy.deploy` with the demo spec's defaults: process target, one
serving server and one hot spare of two workers each, the supervisor watching, alerts to a
loopback webhook, the prediction log on a Redis server this suite owns (append-only file, fsync
always, so a ``kill -9`` of Redis loses nothing Redis acknowledged).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos_kit import NOW, AlertReceiver, FaultResult, KillableRedis, write_results

from airmlops.platform import free_port


@pytest.fixture(scope="session")
def chaos_results() -> Iterator[list[FaultResult]]:
    rows: list[FaultResult] = []
    yield rows
    write_results(rows)


# --------------------------------------------------------------------------------------------
# The deployment under test
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Deployment:
    pipeline: str
    root: Path
    url: str
    port: int
    redis: KillableRedis
    alerts: AlertReceiver
    entities: list[str]
    deploy_args: dict[str, Any]
    """What the version serving was deployed with (besides its name and version): a test
    deploys another version the same way."""

    def state(self) -> dict[str, Any]:
        from airmlops.serving.deploy import load_state

        return load_state(self.pipeline, self.root)

    def live(self) -> dict[str, Any]:
        state = self.state()
        return state["slots"][state["active"]]


@pytest.fixture(scope="module")
def deployment(model, bento, tmp_path_factory: pytest.TempPathFactory,
               chaos_results) -> Iterator[Deployment]:
    from airmlops.serving.deploy import deploy, undeploy

    ref, home = bento
    root = tmp_path_factory.mktemp("chaos-root")
    shutil.copytree(model.data_root / "online", root / "online")  # the SQLite online store
    redis_server = KillableRedis(tmp_path_factory.mktemp("chaos-redis"))
    redis_server.start()
    alerts = AlertReceiver()
    port = free_port()
    env = {"MLOPS_DATA_ROOT": str(root), "MLOPS_SERVING_WORKERS": "2",
           "MLOPS_PREDICTION_LOG_REDIS_URL": redis_server.url}
    golden = [{"instances": [{"customer_id": e, "tenure_days": 120}]} for e in model.known[:3]]
    args = dict(artifact=ref.tag, target="process", golden=golden, root=root,
                proxy_port=port, ready_timeout=180, latency_budget_ms=2000, now=NOW, env=env,
                bentoml_home=home, replicas=model.spec.deploy.replicas,
                spares=model.spec.deploy.spares, alerts={"webhook": {"url": alerts.url}})
    try:
        deploy(model.spec.name, model.version, **args)
        yield Deployment(model.spec.name, root, f"http://127.0.0.1:{port}", port,
                         redis_server, alerts, model.known, args)
    finally:
        undeploy(model.spec.name, root)
        alerts.close()
        redis_server.stop()
