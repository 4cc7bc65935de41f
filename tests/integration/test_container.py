"""Model images on the real Docker engine: engine and base image set up, bento to image to server.

The session fixture runs scripts/ensure-docker.sh and scripts/ensure-base-image.sh (a failure
fails the tests; nothing is skipped). The echo bento (tests/integration/fixtures/echo_service)
is built in a throwaway BentoML home and exported; the image is built from it with no network,
run with the host network bound to 127.0.0.1 on a free port, and called. Timings are printed.

Cold costs on this machine: the base image ~2.5 min (once per machine), the wheelhouse ~30 s
(once per requirements set), the image ~85 s (once per requirements set); warm ones are seconds.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from airmlops.platform import free_port
from airmlops.serving.container import (
    ContainerBuildError,
    ImageRef,
    build_image,
    parse_requirements,
)
from airmlops.serving.docker_engine import (
    docker_client,
    engine_available,
    remove_container,
    validate_image_tag,
)
from airmlops.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration

BASE_IMAGE = os.environ.get("MLOPS_BASE_IMAGE", "airmlops/python:3.11-bookworm")
WHEELHOUSE = PROJECT_ROOT / ".data" / "wheelhouse"  # a cache shared across sessions
FIXTURE = Path(__file__).parent / "fixtures" / "echo_service"
IMAGE_REPO = "airmlops-test/echo-service"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_ENV_NAMES = {
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
}


def _report(message: str) -> None:
    print(f"[container] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class EchoBento:
    archive: Path  # the `bentoml export` output
    store_dir: Path  # the same bento in the store: no models inside
    tag: str
    model_tag: str


@pytest.fixture(scope="session")
def docker_engine() -> Iterator:
    """A Docker engine and the base image, set up by the project's scripts."""
    for script in ("ensure-docker.sh", "ensure-base-image.sh"):
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(PROJECT_ROOT / "scripts" / script)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                f"scripts/{script} failed with exit code {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        last = result.stdout.strip().splitlines()[-1:] or [""]
        _report(f"{script}: {time.monotonic() - started:.1f} s ({last[0]})")
    assert engine_available(), "ensure-docker.sh succeeded but the engine does not answer"
    client = docker_client(timeout=600)
    yield client
    client.close()


def _build_echo_bento(bentoml_home: Path, output_dir: Path) -> Path:
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run(
        [sys.executable, str(FIXTURE / "build_bento.py"), str(output_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"building the echo bento failed:\n{result.stderr[-4000:]}"
    return Path(result.stdout.strip().splitlines()[-1])


def _bento_in_store(bentoml_home: Path) -> tuple[Path, str, str]:
    """The newest echo bento's store folder, its tag and its model's tag."""
    import yaml

    folders = [p for p in (bentoml_home / "bentos" / "echo_service").iterdir() if p.is_dir()]
    folder = max(folders, key=lambda p: p.stat().st_mtime)
    manifest = yaml.safe_load((folder / "bento.yaml").read_text())
    model_tag = manifest["services"][0]["models"][0]["tag"]
    return folder, f"{manifest['name']}:{manifest['version']}", model_tag


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bentoml-home")


@pytest.fixture(scope="module")
def echo_bento(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> EchoBento:
    started = time.monotonic()
    archive = _build_echo_bento(bentoml_home, tmp_path_factory.mktemp("bento-export"))
    store_dir, tag, model_tag = _bento_in_store(bentoml_home)
    _report(f"echo bento {tag} built and exported in {time.monotonic() - started:.1f} s")
    return EchoBento(archive=archive, store_dir=store_dir, tag=tag, model_tag=model_tag)


def _build(client, bento: Path, tag: str) -> tuple[ImageRef, float]:
    """Build ``tag`` and drop the image the tag named before (keeps the layer cache)."""
    try:
        previous = client.images.get(tag).id
    except Exception:
        previous = None
    started = time.monotonic()
    ref = build_image(
        bento,
        tag,
        BASE_IMAGE,
        WHEELHOUSE,
        labels={"ai.airmlops.model": "echo_model", "ai.airmlops.bento": "overridden?"},
        client=client,
        progress=_report,
    )
    elapsed = time.monotonic() - started
    if previous and previous != ref.id:
        try:
            client.images.remove(previous)
        except Exception as exc:  # still used by a container: harmless
            _report(f"kept previous image {previous[:19]}: {exc}")
    return ref, elapsed


def _wait_ready(container, url: str, timeout: float = 120.0) -> float:
    started = time.monotonic()
    with httpx.Client(trust_env=False, timeout=2.0) as http:
        while time.monotonic() - started < timeout:
            container.reload()
            if container.status in ("exited", "dead"):
                logs = container.logs(tail=60).decode(errors="replace")
                pytest.fail(f"container exited before it was ready:\n{logs}")
            try:
                if http.get(url).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    logs = container.logs(tail=60).decode(errors="replace")
    pytest.fail(f"{url} not ready within {timeout} s:\n{logs}")


def _pem_blocks(text: str) -> set[str]:
    blocks, current = set(), []
    for line in text.splitlines():
        line = line.strip()
        if line == "-----BEGIN CERTIFICATE-----":
            current = []
        elif line == "-----END CERTIFICATE-----":
            blocks.add("".join(current))
        else:
            current.append(line)
    return blocks


def _cat_in(client, image: str, path: str) -> str:
    output = client.containers.run(
        image, ["cat", path], network_mode="none", remove=True, user="0", entrypoint=[]
    )
    return output.decode()


def test_scripts_are_idempotent(docker_engine) -> None:
    """A second run of each script finds everything in place and changes nothing."""
    base_id = docker_engine.images.get(BASE_IMAGE).id
    for script, expected in (
        ("ensure-docker.sh", "already running"),
        ("ensure-base-image.sh", "present"),
    ):
        result = subprocess.run(
            ["bash", str(PROJECT_ROOT / "scripts" / script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout, result.stdout
    assert docker_engine.images.get(BASE_IMAGE).id == base_id


def test_bad_inputs_are_refused_before_any_build(docker_engine, echo_bento: EchoBento) -> None:
    with pytest.raises(ValueError, match="invalid image tag"):
        build_image(echo_bento.archive, "Echo:1;rm -rf /", BASE_IMAGE, WHEELHOUSE)
    with pytest.raises(ValueError, match="invalid image reference"):
        build_image(echo_bento.archive, f"{IMAGE_REPO}:x", "bad base$(id)", WHEELHOUSE)
    with pytest.raises(ValueError, match="invalid image tag"):
        validate_image_tag(f"{IMAGE_REPO}:ok\n")
    with pytest.raises(ContainerBuildError, match="credentials"):
        parse_requirements("--index-url https://user:token@pypi.example.com/simple\nnumpy==2\n")
    assert parse_requirements(
        "--index-url https://pypi.org/simple\n\n# comment\nNumPy==2.4.6\nskops==0.16.0 # pin\n"
    ) == ["NumPy==2.4.6", "skops==0.16.0"]


def test_bento_store_folder_without_models_is_refused(docker_engine, echo_bento: EchoBento) -> None:
    """The bare store folder has no models/: the build says to use `bentoml export` output."""
    assert not (echo_bento.store_dir / "models").exists()
    with pytest.raises(ContainerBuildError, match="bentoml export"):
        build_image(
            echo_bento.store_dir,
            f"{IMAGE_REPO}:never",
            BASE_IMAGE,
            WHEELHOUSE,
            client=docker_engine,
        )
    assert not any(f"{IMAGE_REPO}:never" in image.tags for image in docker_engine.images.list())


def test_image_builds_runs_as_non_root_and_answers(docker_engine, echo_bento: EchoBento) -> None:
    client = docker_engine
    tag = f"{IMAGE_REPO}:test"
    ref, build_seconds = _build(client, echo_bento.archive, tag)
    _report(f"image {tag}: {ref.size / 1e6:.0f} MB, built in {build_seconds:.1f} s")
    assert ref.id.startswith("sha256:") and ref.tag == tag and ref.size > 0

    image = client.images.get(ref.id)
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert "3000/tcp" in config["ExposedPorts"]
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["BENTOML_DO_NOT_TRACK"] == "true"
    assert env["BENTOML_HOME"] == "/home/bentoml"
    assert not CA_ENV_NAMES & env.keys(), (
        f"CA settings in the image env: {CA_ENV_NAMES & env.keys()}"
    )
    assert not any(name.lower().endswith("_proxy") for name in env), env
    assert not any("ca-certificates.crt" in value for value in env.values()), env
    assert config["Labels"]["ai.airmlops.bento"] == echo_bento.tag  # the build's own label wins
    assert config["Labels"]["ai.airmlops.model"] == "echo_model"

    # The CA bundle is the base image's own; no certificate only the host trusts is anywhere.
    bundle_path = str(HOST_CA_BUNDLE)
    image_bundle = _cat_in(client, ref.id, bundle_path)
    assert image_bundle == _cat_in(client, BASE_IMAGE, bundle_path)
    host_only = _pem_blocks(HOST_CA_BUNDLE.read_text()) - _pem_blocks(image_bundle)
    _report(f"{len(host_only)} host-only CA certificate(s) searched for in the image")
    if host_only:
        needles = [block[64:128] for block in host_only]
        grep = ["grep", "-rlF", "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev"]
        for needle in needles:
            grep += ["-e", needle]
        search = client.containers.run(
            ref.id, [*grep, "/"], network_mode="none", user="0", entrypoint=[], detach=True
        )
        try:
            exit_code = search.wait(timeout=120)["StatusCode"]
            found = search.logs().decode(errors="replace")
        finally:
            search.remove(force=True)
        assert exit_code == 1, f"host CA certificate content found in the image: {found}"

    port = free_port()
    name = f"airmlops-test-echo-{port}"
    container = client.containers.run(
        ref.id,
        name=name,
        detach=True,
        network_mode="host",
        environment={"BENTOML_HOST": "127.0.0.1", "BENTOML_PORT": str(port)},
        labels={"ai.airmlops.test": "test_container"},
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        ready_seconds = _wait_ready(container, f"{base_url}/readyz")
        _report(f"container ready in {ready_seconds:.1f} s")

        with httpx.Client(trust_env=False, timeout=10.0) as http:
            response = http.post(
                f"{base_url}/predict",
                json={"rows": [[1.0, 2.0, 3.0], [0.0, -1.0, 0.0]], "text": "hi"},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["echo"] == "hi"
            assert body["model"] == echo_bento.model_tag
            assert len(body["probabilities"]) == 2
            assert all(0.0 <= p <= 1.0 for p in body["probabilities"])
            assert body["probabilities"][1] > 0.5 > body["probabilities"][0]
            assert http.post(f"{base_url}/predict", json={"rows": []}).status_code == 400
            assert http.get(f"{base_url}/livez").status_code == 200
            assert "bentoml" in http.get(f"{base_url}/metrics").text

        uid = container.exec_run(["id", "-u"]).output.decode().strip()
        assert uid == "10001"
        top = container.top(ps_args="-o pid,uid,comm")
        assert all(row[1] != "0" for row in top["Processes"]), top

        container.reload()
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert all(
            not net.get("IPAddress")
            for net in container.attrs["NetworkSettings"]["Networks"].values()
        )

        # The HEALTHCHECK works: the first probe runs one interval (10 s) after the start.
        deadline = time.monotonic() + 40
        health = None
        while time.monotonic() < deadline:
            container.reload()
            health = container.attrs["State"].get("Health", {}).get("Status")
            if health == "healthy":
                break
            time.sleep(1)
        assert health == "healthy", container.attrs["State"].get("Health")
    finally:
        remove_container(client, name, timeout=5)
    assert name not in [c.name for c in client.containers.list(all=True)]


def test_rebuilding_reuses_layers(
    docker_engine, echo_bento: EchoBento, bentoml_home: Path, tmp_path: Path
) -> None:
    """Same bento again: the same image. A new model version: only the bento layer is new."""
    client = docker_engine
    tag = f"{IMAGE_REPO}:test"
    first, _ = _build(client, echo_bento.archive, tag)
    again, same_seconds = _build(client, echo_bento.archive, tag)
    _report(f"rebuild of the same bento: {same_seconds:.1f} s")
    assert again.id == first.id

    new_archive = _build_echo_bento(bentoml_home, tmp_path)
    _, new_bento_tag, _ = _bento_in_store(bentoml_home)
    assert new_bento_tag != echo_bento.tag
    second, warm_seconds = _build(client, new_archive, f"{IMAGE_REPO}:test-next")
    _report(f"image for a new bento version (warm): {warm_seconds:.1f} s")
    assert second.id != first.id
    first_layers = client.images.get(first.id).attrs["RootFS"]["Layers"]
    second_layers = client.images.get(second.id).attrs["RootFS"]["Layers"]
    assert len(first_layers) == len(second_layers)
    assert first_layers[:-1] == second_layers[:-1], "dependency layers were rebuilt"
    assert first_layers[-1] != second_layers[-1]
