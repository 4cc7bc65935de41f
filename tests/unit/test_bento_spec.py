"""The spec a model service loads from its bento loads whatever this process's data roots are
(a build sandbox or a container has other ones). Its refusals (an edited spec, by hash; a spec
file outside the bento) are in tests/security/test_bento_spec_hash.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from airmlops.serving.service import ServingConfig, load_bento_spec
from airmlops.spec import parse_spec

DEMO = Path(__file__).resolve().parents[2] / "include" / "pipelines" / "churn.yaml"


def _bento(tmp_path: Path, source_root: Path) -> tuple[Path, ServingConfig]:
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


def test_a_spec_validated_under_another_data_root_loads_in_the_service(tmp_path, monkeypatch):
    """The worker validated the spec under its allowed root; the service process has only its
    own data root (as in the bento build's sandbox and in a model container)."""
    worker_root = tmp_path / "datasets"
    root, config = _bento(tmp_path, worker_root)
    monkeypatch.setenv("MLOPS_DATA_ROOT", str(tmp_path / "service-data"))
    assert load_bento_spec(root, config).spec_hash() == config.spec_hash
