"""What the deploy-strategy tests through the training DAG share: a small demo spec written
for a pipeline, one `airflow dags test` run of its training DAG, and a load of /predict
requests for the customers the online store knows, recording every answer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
CUSTOMERS = 1000


def small_spec(pipeline: str, port: int, **deploy: Any) -> dict[str, Any]:
    """The demo spec for ``pipeline``: 1,000 customers, a 3 s bake on a process target at
    ``port``, the ``deploy`` settings given, and a champion gate any retrained version passes
    (these tests are about deploys, not about the gates)."""
    spec = yaml.safe_load((REPO_ROOT / "include/pipelines/churn.yaml").read_text())
    spec["name"] = pipeline
    spec["source"]["customers"] = CUSTOMERS
    spec["training"]["min_rows"] = 500
    spec["deploy"].update(port=port, bake_seconds=3, target="process", **deploy)
    spec["gates"]["champion"]["max_regression"] = 1.0
    return spec


def write_spec(folder: Path, spec: dict[str, Any]) -> None:
    """Write ``spec`` as the pipeline's YAML file in ``folder``."""
    (folder / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))


def run_training(env: dict[str, str], pipeline: str, logical_date: str, *,
                 succeed: bool = True) -> subprocess.CompletedProcess[str]:
    """One run of the pipeline's training DAG; it must succeed (or, with ``succeed=False``,
    fail)."""
    command = [AIRFLOW, "dags", "test", f"{pipeline}_training", logical_date]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout[-5000:] + result.stderr[-5000:]
    assert (result.returncode == 0) == succeed, output
    return result


class CustomerLoad:
    """Threads sending /predict for the customers in turn. Records each answer's version per
    customer, every answer as ``(time, customer, version, request id)``, and every failure."""

    def __init__(self, port: int, customers: list[str], threads: int = 2,
                 pace: float = 0.03) -> None:
        self.url, self.pace = f"http://127.0.0.1:{port}/predict", pace
        self.customers = customers
        self.versions: dict[str, list[str]] = defaultdict(list)
        self.answers: list[tuple[float, str, str, str]] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> CustomerLoad:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)

    def _run(self, index: int) -> None:
        turn = index * 389
        with httpx.Client(timeout=15.0, trust_env=False) as client:
            while not self._stop.is_set():
                customer = self.customers[turn % len(self.customers)]
                turn += 1
                body = {"instances": [{"customer_id": customer, "tenure_days": 200}]}
                try:
                    response = client.post(self.url, json=body)
                except httpx.HTTPError as error:
                    failure, answer = repr(error), None
                else:
                    ok = response.status_code == 200
                    failure = None if ok else f"{response.status_code} {response.text[:200]}"
                    answer = response.json() if ok else None
                with self._lock:
                    if answer is None:
                        self.failures.append(str(failure))
                    else:
                        version = str(answer["model_version"])
                        self.versions[customer].append(version)
                        self.answers.append((time.time(), customer, version,
                                             str(answer["request_id"])))
                time.sleep(self.pace)


def known_customers(root: Path, pipeline: str) -> list[str]:
    """The customers of the first run's held-out rows: the online store knows them all (the
    deploy's smoke requests are drawn from the same rows)."""
    import pandas as pd

    test_path = next((root / "training_sets" / pipeline).glob("*/test.parquet"))
    customers = sorted(set(pd.read_parquet(test_path, columns=["customer_id"])["customer_id"]))
    assert len(customers) >= 100, len(customers)
    return customers
