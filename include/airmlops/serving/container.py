"""A real Docker image from an exported bento, built with no network and no registry.

Why not ``bentoml containerize``: its default needs BuildKit (buildx is missing here), its
generated Dockerfile installs packages from the index inside the build (which needs the host's CA
bundle in the image), and a ``base_image`` in bentofile.yaml still adds an apt build-essential
layer. Instead:

1. the bento comes from ``bentoml export`` (a ``.bento`` archive or its extracted folder): that is
   the form that carries the models, under ``models/``; the bare store folder does not
   (:mod:`~airmlops.serving.bento_archive`);
2. the service's locked requirements (``env/python/requirements.txt``) are downloaded on the host
   as manylinux wheels for the base image (:mod:`~airmlops.serving.base_image`) into a wheelhouse
   cache shared by every build (only what is missing is downloaded; each requirements set is
   recorded by its hash: :mod:`~airmlops.serving.wheelhouse`);
3. a hand-written two-stage Dockerfile ``FROM`` the base image installs those wheels into
   ``/opt/venv`` with ``--no-index`` and copies the bento to ``/home/bentoml/bento``. It is built
   by the classic builder (the Docker SDK never uses BuildKit) with ``network_mode="none"``.

The image runs ``bentoml serve`` (through :mod:`airmlops.serving.slot_server`, so the process
manager's control endpoints are private unix sockets, never TCP ports) as uid 10001, exposes
3000 and has a HEALTHCHECK on ``/readyz``. Bind address and port come from BentoML's own
``BENTOML_HOST`` / ``BENTOML_PORT`` environment variables (defaults ``0.0.0.0`` / ``3000``;
the healthcheck reads the same port).
Nothing secret goes in: no CA bundle beyond the base image's own ``ca-certificates``, no proxy
settings, no index credentials (a bento whose requirements carry any is refused).

How such an image is run (no capabilities, no privilege gain, uid 10001, a read-only root
filesystem, the limits of the spec's ``deploy.resources``) is
:func:`~airmlops.serving.run_options.hardened_run_options`. Every name of those modules that
callers import from here is re-exported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.serving import slot_server
from airmlops.serving.base_image import BaseImageInfo, probe_base_image
from airmlops.serving.bento_archive import BentoInfo, read_bento, unpack_bento
from airmlops.serving.build_common import ContainerBuildError, Progress
from airmlops.serving.docker_engine import (
    check_network_mode,
    validate_image_ref,
    validate_image_tag,
)
from airmlops.serving.run_options import (
    MAX_CPUS,
    MAX_MEMORY_MB,
    MAX_PIDS,
    MIN_CPUS,
    MIN_MEMORY_MB,
    MIN_PIDS,
    SCRATCH_DIRS,
    SCRATCH_TMPFS_OPTIONS,
    SERVICE_UID,
    ContainerResources,
    hardened_run_options,
)
from airmlops.serving.wheelhouse import WheelSet, parse_requirements, prepare_wheelhouse

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = [
    "BENTO_DIR_IN_IMAGE", "BUILD_NETWORK_MODE", "DOCKERFILE", "MAX_CPUS", "MAX_MEMORY_MB",
    "MAX_PIDS", "MIN_CPUS", "MIN_MEMORY_MB", "MIN_PIDS", "SCRATCH_DIRS", "SCRATCH_TMPFS_OPTIONS",
    "SERVICE_UID", "BaseImageInfo", "BentoInfo", "ContainerBuildError", "ContainerResources",
    "ImageRef", "Progress", "WheelSet", "build_image", "hardened_run_options",
    "parse_requirements", "prepare_wheelhouse", "probe_base_image", "read_bento",
]

logger = logging.getLogger(__name__)

BENTO_DIR_IN_IMAGE = "/home/bentoml/bento"
BUILD_NETWORK_MODE = "none"

_LABEL_KEY = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,126}[a-z0-9])?$")

DOCKERFILE = """\
# Model image written by airmlops.serving.container: classic builder, built with --network none.
# Stage 1 installs the service's locked requirements from a wheelhouse prepared on the host;
# stage 2 takes that virtualenv and the exported bento (code and models) and runs as uid 10001.
ARG BASE_IMAGE

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY requirements.txt /build/requirements.txt
COPY wheels/ /build/wheels/
RUN python3 -m venv /opt/venv \\
 && /opt/venv/bin/python -m pip install --quiet --no-index --only-binary=:all: \\
        --find-links /build/wheels -r /build/requirements.txt \\
 && /opt/venv/bin/python -m pip check

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 bentoml \\
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/bentoml --create-home \\
        --shell /usr/sbin/nologin bentoml
ENV VIRTUAL_ENV=/opt/venv \\
    PATH=/opt/venv/bin:${PATH} \\
    LANG=C.UTF-8 \\
    LC_ALL=C.UTF-8 \\
    PYTHONUNBUFFERED=1 \\
    PYTHONDONTWRITEBYTECODE=1 \\
    BENTOML_HOME=/home/bentoml \\
    BENTO_PATH=/home/bentoml/bento \\
    BENTOML_CONTAINERIZED=true \\
    BENTOML_DO_NOT_TRACK=true \\
    BENTOML_HOST=0.0.0.0 \\
    BENTOML_PORT=3000
COPY --from=builder /opt/venv /opt/venv
COPY slot_server.py /opt/airmlops/slot_server.py
COPY bento/ /home/bentoml/bento/
WORKDIR /home/bentoml/bento
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \\
  CMD ["python3", "-c", "import os, urllib.request as u; \\
port = os.environ.get('BENTOML_PORT', '3000'); \\
u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/readyz', timeout=4)"]
ENTRYPOINT ["python3", "/opt/airmlops/slot_server.py", "serve", "/home/bentoml/bento"]
"""
"""The Dockerfile of every model image. It is a constant: the only inputs are the validated
``BASE_IMAGE`` build argument and the build context this module assembles."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A built image: its id (``sha256:...``), the tag it was built as, and its size in bytes."""

    id: str
    tag: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


def build_image(
    bento: Path,
    tag: str,
    base_image: str,
    wheelhouse: Path,
    *,
    labels: Mapping[str, str] | None = None,
    client: DockerClient | None = None,
    progress: Progress | None = None,
    build_timeout: float = 1800.0,
) -> ImageRef:
    """Build the image ``tag`` from an exported bento (``.bento`` archive or folder).

    ``base_image`` must already be in the engine (nothing is pulled) and have the bento's Python
    minor version on glibc. ``wheelhouse`` is the wheel cache folder (created if missing).
    ``labels`` (e.g. the model name and version) are added to the image besides the bento tag,
    the base image and the wheel set. Raises
    :class:`ContainerBuildError` (or ValueError for a bad tag, base image or label).
    """
    import docker

    say = progress or logger.info
    validate_image_tag(tag)
    validate_image_ref(base_image)
    check_network_mode(BUILD_NETWORK_MODE)
    image_labels = _validate_labels(labels or {})
    wheelhouse = Path(wheelhouse)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    if client is None:
        own_client = docker.from_env(timeout=max(60, round(build_timeout)))
        try:
            return build_image(
                bento,
                tag,
                base_image,
                wheelhouse,
                labels=labels,
                client=own_client,
                progress=progress,
                build_timeout=build_timeout,
            )
        finally:
            own_client.close()
    started = time.monotonic()
    base = _present_base_image(client, base_image, say)

    with _build_directory(wheelhouse) as context:
        info, wheels = _assemble_context(context, Path(bento), base_image, base, wheelhouse, say)
        image_labels = {
            **image_labels,
            "org.opencontainers.image.title": info.name,
            "org.opencontainers.image.version": info.version,
            "org.opencontainers.image.base.name": base_image,
            "ai.airmlops.bento": info.tag,
            "ai.airmlops.wheelset": wheels.key,
        }
        say(f"building {tag} (classic builder, network {BUILD_NETWORK_MODE})")
        image_id = _run_build(client, context, tag, base_image, image_labels, build_timeout, say)

    image = client.images.get(image_id)
    ref = ImageRef(id=image.id, tag=tag, size=int(image.attrs.get("Size", 0)))
    elapsed = time.monotonic() - started
    say(f"built {tag} ({ref.id[:19]}, {ref.size / 1e6:.0f} MB) in {elapsed:.1f} s")
    return ref


def _present_base_image(client: DockerClient, base_image: str, say: Progress) -> BaseImageInfo:
    """Probe ``base_image``, which must already be in the engine (nothing is pulled here)."""
    import docker

    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        raise ContainerBuildError(
            f"base image {base_image!r} is not in the engine (nothing is pulled here); "
            "build it with scripts/ensure-base-image.sh or pull it first"
        ) from None
    base = probe_base_image(client, base_image)
    say(f"base image {base_image}: Python {base.python_version}, glibc {base.glibc_version}")
    return base


def _assemble_context(
    context: Path,
    bento: Path,
    base_image: str,
    base: BaseImageInfo,
    wheelhouse: Path,
    say: Progress,
) -> tuple[BentoInfo, WheelSet]:
    """Fill the build ``context``: the bento, its wheels, requirements, Dockerfile, launcher."""
    bento_dir = context / "bento"
    unpack_bento(bento, bento_dir)
    info = read_bento(bento_dir)
    if info.python_version and info.python_version != base.python_minor:
        raise ContainerBuildError(
            f"bento {info.tag} wants Python {info.python_version} but {base_image} "
            f"has {base.python_version}"
        )
    say(f"bento {info.tag}: {len(info.requirements)} requirements, models {list(info.models)}")

    wheels = prepare_wheelhouse(
        info.requirements,
        wheelhouse,
        python_version=base.python_minor,
        platform_tags=base.platform_tags,
        progress=say,
    )
    wheels_dir = context / "wheels"
    wheels_dir.mkdir()
    for name in wheels.files:
        _link_or_copy(wheels.pool / name, wheels_dir / name)
    (context / "requirements.txt").write_text(
        "# Locked requirements of the bento (sources: the wheelhouse only)\n"
        + "".join(f"{line}\n" for line in info.requirements),
        encoding="utf-8",
    )
    (context / "Dockerfile").write_text(DOCKERFILE, encoding="utf-8")
    # `bentoml serve` with circus's control endpoints on private unix sockets: with the
    # host network, TCP ones would answer anyone on the machine.
    shutil.copyfile(Path(slot_server.__file__), context / "slot_server.py")
    _normalise_permissions(context)
    return info, wheels


def _run_build(
    client: DockerClient,
    context: Path,
    tag: str,
    base_image: str,
    labels: dict[str, str],
    timeout: float,
    say: Progress,
) -> str:
    """Stream a classic-builder build of ``context``; return the image id or raise with the log."""
    log: list[str] = []
    image_id: str | None = None
    stream = client.api.build(
        path=str(context),
        dockerfile="Dockerfile",
        tag=tag,
        buildargs={"BASE_IMAGE": base_image},
        network_mode=check_network_mode(BUILD_NETWORK_MODE),
        labels=labels,
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
        timeout=round(timeout),
        use_config_proxy=False,  # never copy the client's proxy settings into build args
    )
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk.get("error")
            tail = "".join(log[-40:])
            raise ContainerBuildError(f"image build of {tag} failed: {detail}\n{tail}")
        text = chunk.get("stream")
        if text:
            log.append(text)
            if text.startswith("Step "):
                say(f"  {text.strip()}")
            match = re.match(r"Successfully built ([0-9a-f]{12,64})", text)
            if match:
                image_id = match.group(1)
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("ID"):
            image_id = aux["ID"]
    if image_id is None:
        tail = "".join(log[-40:])
        raise ContainerBuildError(f"image build of {tag} ended without an image id:\n{tail}")
    return image_id


def _normalise_permissions(root: Path) -> None:
    """World-readable, root-writable context (models are saved 0700 by BentoML)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` (same filesystem), else copy it."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` checked as image labels (key form, printable value up to 1024 characters)."""
    result: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"invalid image label key {key!r}")
        if not isinstance(value, str) or len(value) > 1024 or not value.isprintable():
            raise ValueError(f"invalid value for image label {key!r}")
        result[key] = value
    return result


@contextmanager
def _build_directory(wheelhouse: Path) -> Iterator[Path]:
    """A scratch build context beside the wheel pool (so wheels are hard links, not copies)."""
    directory = Path(tempfile.mkdtemp(prefix=".build-", dir=wheelhouse))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
