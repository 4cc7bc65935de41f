"""A model service loads only the spec its bento was built with: a ``spec.yaml`` edited after
the build is refused by its hash, and a spec file named outside the bento is refused by its
path (:func:`airmlops.serving.service.load_bento_spec`)."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_a_spec_edited_after_the_build_is_refused(tmp_path):
    root, config = _bento(tmp_path, tmp_path / "datasets")
    spec_file = root / "spec.yaml"
    spec_file.write_text(spec_file.read_text() + "owner: someone\n")
    with pytest.raises(ValueError, match="is not the spec this bento was built with"):
        load_bento_spec(root, config)


def test_a_spec_file_outside_the_bento_is_refused(tmp_path):
    root, config = _bento(tmp_path, tmp_path / "datasets")
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        load_bento_spec(root, config.model_copy(update={"spec_file": "../../etc/passwd"}))
