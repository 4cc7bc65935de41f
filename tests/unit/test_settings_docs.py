"""Every setting is documented where users look: `.env.example` and docs/settings.md's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from airmlops.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = [f"MLOPS_{name.upper()}" for name in Settings.model_fields]


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_is_in_env_example_and_the_readme_table(name: str):
    env_example = (REPO_ROOT / ".env.example").read_text()
    readme = (REPO_ROOT / "docs" / "settings.md").read_text()
    assert f"{name}=" in env_example, f"{name} is not documented in .env.example"
    assert f"| `{name}` |" in readme, f"{name} is missing from docs/settings.md's table"


def test_settings_read_the_mlops_prefix_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLOPS_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MLOPS_WEBHOOK_BRANCHES", '["main", "release"]')
    settings = Settings()
    assert settings.data_root == tmp_path
    assert settings.webhook_branches == ["main", "release"]
    assert settings.wheelhouse == tmp_path / "wheelhouse"
