"""Small specs the tests share: the loans spec of a user's own file source, and a bento folder
of the demo spec whose sources live under a given root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from airmlops.serving.service import ServingConfig
from airmlops.spec import parse_spec

DEMO = Path(__file__).resolve().parents[1] / "include" / "pipelines" / "churn.yaml"

LOANS_SPEC: dict[str, Any] = {
    "name": "loans",
    "task": "binary_classification",
    "source": {"kind": "file", "path": "history/*.csv"},
    "entity_key": "loan_id",
    "timestamp": "event_time",
    "label": "defaulted",
    "features": [
        {"name": "amount", "type": "numeric", "min": 0, "max": 100_000},
        {"name": "grade", "type": "categorical", "values": ["A", "B", "C"]},
        {"name": "income", "type": "numeric", "min": 0, "max_null_fraction": 0.2},
    ],
    "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
    "gates": {"primary_metric": "roc_auc"},
}
"""A file-source spec of loans with a numeric, a categorical and a nullable feature."""


def demo_bento(tmp_path: Path, source_root: Path) -> tuple[Path, ServingConfig]:
    """A bento folder whose spec reads files under ``source_root``, validated there."""
    data = yaml.safe_load(DEMO.read_text())
    data["source"] = {"kind": "file", "path": str(source_root / "raw" / "*.csv")}
    data["feature_store"]["events_path"] = str(source_root / "events" / "*.csv")
    data["feature_store"]["profiles_path"] = str(source_root / "profiles" / "*.csv")
    spec = parse_spec(data, data_roots=[source_root])
    root = tmp_path / "bento"
    root.mkdir()
    (root / "spec.yaml").write_text(yaml.safe_dump(data))
    config = ServingConfig(pipeline=spec.name, model_name=spec.name, model_version="1",
                           model_uri="models:/churn/1", spec_hash=spec.spec_hash(),
                           features_hash=spec.features_hash())
    return root, config
