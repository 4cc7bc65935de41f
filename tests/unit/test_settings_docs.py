"""Every setting is documented where users look: `.env.example` and docs/settings.md's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from airmlops.settings import Settings, environment_variables

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = sorted(environment_variables())


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_is_in_env_example_and_the_settings_page(name: str):
    env_example = (REPO_ROOT / ".env.example").read_text()
    page = (REPO_ROOT / "docs" / "settings.md").read_text()
    assert f"{name}=" in env_example, f"{name} is not documented in .env.example"
    assert f"| `{name}` |" in page, f"{name} is missing from docs/settings.md's tables"


def test_the_sections_are_read_through_the_one_settings_object(monkeypatch):
    monkeypatch.setenv("MLOPS_SERVING_WORKERS", "3")
    monkeypatch.setenv("MLOPS_PREDICTION_LOG_BATCH_SIZE", "64")
    monkeypatch.setenv("MLOPS_AIRFLOW_PORT", "18080")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    settings = Settings()
    assert settings.serving.workers == 3
    assert settings.prediction_log.batch_size == 64
    assert settings.platform.airflow_port == 18080
    assert settings.mlflow_client.tracking_username == "reader"


def test_settings_read_the_mlops_prefix_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLOPS_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MLOPS_WEBHOOK_BRANCHES", '["main", "release"]')
    settings = Settings()
    assert settings.data_root == tmp_path
    assert settings.webhook_branches == ["main", "release"]
    assert settings.wheelhouse == tmp_path / "wheelhouse"
