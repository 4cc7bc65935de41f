"""The spec a model service loads from its bento loads whatever this process's data roots are
(a build sandbox or a container has other ones). Its refusals (an edited spec, by hash; a spec
file outside the bento) are in tests/security/test_bento_spec_hash.py."""

from __future__ import annotations

from toy_specs import demo_bento

from airmlops.serving.service import load_bento_spec


def test_a_spec_validated_under_another_data_root_loads_in_the_service(tmp_path, monkeypatch):
    """The worker validated the spec under its allowed root; the service process has only its
    own data root (as in the bento build's sandbox and in a model container)."""
    worker_root = tmp_path / "datasets"
    root, config = demo_bento(tmp_path, worker_root)
    monkeypatch.setenv("MLOPS_DATA_ROOT", str(tmp_path / "service-data"))
    assert load_bento_spec(root, config).spec_hash() == config.spec_hash
