"""Images of the tiny versioned BentoML service (``integration/fixtures/versioned_service``),
built once per session on the local engine: the docker deploys of tests/integration/
test_deploy.py and the container faults of tests/chaos share them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "integration" / "fixtures" / "versioned_service"
V1 = "versioned_service:v1-ok"
V2 = "versioned_service:v2-ok"
BROKEN = "versioned_service:v3-init-fails"
BASE_IMAGE = os.environ.get("MLOPS_BASE_IMAGE", "airmlops/python:3.11-bookworm")
IMAGE_REPO = "airmlops-test/versioned-service"


@pytest.fixture(scope="session")
def versioned_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Images of the v1, v2 and broken builds (engine and base image set up by the scripts)."""
    from airmlops.serving.container import build_image
    from airmlops.serving.docker_engine import engine_available
    from airmlops.settings import PROJECT_ROOT

    for script in ("ensure-docker.sh", "ensure-base-image.sh"):
        result = subprocess.run(
            ["bash", str(PROJECT_ROOT / "scripts" / script)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, f"scripts/{script}:\n{result.stdout}\n{result.stderr}"
    assert engine_available()

    home = tmp_path_factory.mktemp("bentoml-home-images")
    exported = tmp_path_factory.mktemp("exported-bentos")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run(
        [
            sys.executable,
            str(FIXTURE / "build_bento.py"),
            "--export",
            str(exported),
            "1:ok",
            "2:ok",
            "3:init_fails",
        ],
        env=env,
        cwd=str(home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    images: dict[str, str] = {}
    started = time.monotonic()
    for line in built.stdout.splitlines():
        tag, archive = line.split()
        image_tag = f"{IMAGE_REPO}:{tag.split(':')[1]}"
        # The wheelhouse is the cache the container tests share (.data/wheelhouse).
        build_image(Path(archive), image_tag, BASE_IMAGE, PROJECT_ROOT / ".data" / "wheelhouse")
        images[tag] = image_tag
    print(f"\n[deploy] images built in {time.monotonic() - started:.1f} s")
    return images


