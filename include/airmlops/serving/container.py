"""A real Docker image from an exported bento, built with no network and no registry.

Why not ``bentoml containerize``: its default needs BuildKit (buildx is missing here), its
generated Dockerfile installs packages from the index inside the build (which needs the host's CA
bundle in the image), and a ``base_image`` in bentofile.yaml still adds an apt build-essential
layer. Instead:

1. the bento comes from ``bentoml export`` (a ``.bento`` archive or its extracted folder): that is
   the form that carries the models, under ``models/``; the bare store folder does not;
2. the service's locked requirements (``env/python/requirements.txt``) are downloaded on the host
   as cp311 manylinux wheels into a wheelhouse cache shared by every build (only what is missing
   is downloaded; each requirements set is recorded by its hash);
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

:func:`hardened_run_options` is how such an image is run: no capabilities, no privilege gain,
uid 10001, a read-only root filesystem (scratch space on small tmpfs mounts), and the memory,
CPU and process limits of :class:`ContainerResources` (from the spec's ``deploy.resources``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.paths import atomic_write_json, safe_join
from airmlops.serving import slot_server
from airmlops.serving.docker_engine import (
    check_network_mode,
    validate_image_ref,
    validate_image_tag,
)

if TYPE_CHECKING:
    from docker import DockerClient

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

BENTO_DIR_IN_IMAGE = "/home/bentoml/bento"
SERVICE_UID = 10001
BUILD_NETWORK_MODE = "none"

_BENTO_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62}[a-z0-9])?$")
_BENTO_VERSION = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,126}[a-z0-9])?$")
_URL_WITH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@]+@")
_PYTHON_MINOR = re.compile(r"^3\.[0-9]{1,2}$")
_SCRATCH_DIR = re.compile(r"/[A-Za-z0-9_./-]{1,255}")
# Requirement-file options that only say where packages come from: dropped (the build has no
# index; the wheelhouse is the only source). Any other option is refused.
_SOURCE_OPTIONS = (
    "--index-url",
    "-i",
    "--extra-index-url",
    "--find-links",
    "-f",
    "--trusted-host",
    "--no-index",
    "--prefer-binary",
)

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


class ContainerBuildError(RuntimeError):
    """The bento, the wheelhouse or the image build failed; the message says which and why."""


MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 262_144
MIN_CPUS, MAX_CPUS = 0.1, 64.0
MIN_PIDS, MAX_PIDS = 32, 32_768


@dataclasses.dataclass(frozen=True)
class ContainerResources:
    """What one model container may use: memory (MiB, no swap beyond it), CPUs, processes."""

    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 512

    def __post_init__(self) -> None:
        checks = (
            ("memory_mb", self.memory_mb, int, MIN_MEMORY_MB, MAX_MEMORY_MB),
            ("cpus", self.cpus, (int, float), MIN_CPUS, MAX_CPUS),
            ("pids", self.pids, int, MIN_PIDS, MAX_PIDS),
        )
        for name, value, kind, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
                raise ValueError(
                    f"deploy.resources.{name}: expected a number from {low} to {high}, "
                    f"got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCRATCH_TMPFS_OPTIONS = "rw,nosuid,nodev,noexec,size=64m,mode=1777"
"""Writable scratch space of a model container whose root filesystem is read-only."""
SCRATCH_DIRS = (
    "/tmp",  # noqa: S108 (inside the container)
    *(f"/home/bentoml/{name}" for name in ("bentos", "models", "envs", "tmp")),
    "/home/bentoml/prometheus_multiproc_dir",
)
"""Where BentoML writes at run time: temporary files, the store folders it creates under
``BENTOML_HOME`` on start (empty: the served bento carries its models), and its metrics'
multiprocess folder."""


def hardened_run_options(
    resources: ContainerResources, scratch_dirs: Sequence[str] = ()
) -> dict[str, Any]:
    """``containers.run`` keyword arguments that confine a model container.

    Every capability dropped, ``no-new-privileges``, the image's non-root user, a read-only
    root filesystem with tmpfs scratch folders (:data:`SCRATCH_DIRS` plus ``scratch_dirs``,
    e.g. the service's data root), and the memory (no extra swap), CPU and pids limits of
    ``resources``. The caller chooses the network (``host`` or ``none``).
    """
    tmpfs: dict[str, str] = {}
    for directory in (*SCRATCH_DIRS, *scratch_dirs):
        absolute = isinstance(directory, str) and _SCRATCH_DIR.fullmatch(directory)
        if not absolute or ".." in directory.split("/"):
            raise ValueError(f"invalid scratch folder {directory!r}: expected an absolute path")
        tmpfs[directory] = SCRATCH_TMPFS_OPTIONS
    memory = f"{resources.memory_mb}m"
    return {
        "user": f"{SERVICE_UID}:{SERVICE_UID}",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "read_only": True,
        "tmpfs": tmpfs,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": round(resources.cpus * 1e9),
        "pids_limit": resources.pids,
    }


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A built image: its id (``sha256:...``), the tag it was built as, and its size in bytes."""

    id: str
    tag: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BaseImageInfo:
    """What the wheels must match in a base image: Python version, glibc version, machine."""

    python_version: str
    glibc_version: str
    machine: str

    @property
    def python_minor(self) -> str:
        return ".".join(self.python_version.split(".")[:2])

    @property
    def platform_tags(self) -> tuple[str, ...]:
        """Every manylinux platform tag this glibc runs, newest first.

        pip does not expand ``manylinux_2_Y`` to older tags by itself (only the legacy
        ``manylinux2014``/``2010`` aliases), so the whole list is passed to ``pip download``.
        """
        major, minor = (int(part) for part in self.glibc_version.split(".")[:2])
        if major != 2:
            raise ContainerBuildError(f"unsupported glibc {self.glibc_version}")
        tags = [f"manylinux_2_{y}_{self.machine}" for y in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.machine}" for y, name in legacy.items() if y <= minor]
        return tuple(tags)


@dataclasses.dataclass(frozen=True)
class BentoInfo:
    """The parts of an exported bento's ``bento.yaml`` the image build needs."""

    name: str
    version: str
    python_version: str | None
    requirements: tuple[str, ...]
    models: tuple[str, ...]

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


@dataclasses.dataclass(frozen=True)
class WheelSet:
    """The wheels satisfying one requirements set; ``downloaded`` counts files new to the cache."""

    key: str
    pool: Path
    files: tuple[str, ...]
    downloaded: int


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

    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        raise ContainerBuildError(
            f"base image {base_image!r} is not in the engine (nothing is pulled here); "
            "build it with scripts/ensure-base-image.sh or pull it first"
        ) from None
    base = probe_base_image(client, base_image)
    say(f"base image {base_image}: Python {base.python_version}, glibc {base.glibc_version}")

    with _build_directory(wheelhouse) as context:
        bento_dir = context / "bento"
        _unpack_bento(Path(bento), bento_dir)
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


def read_bento(bento_dir: Path) -> BentoInfo:
    """Read and check an unpacked, exported bento: its tag, Python, requirements and models.

    Every model the bento's services declare must be present under ``models/`` (a bento taken
    straight from the store has none: ``bentoml export`` adds them).
    """
    import yaml

    bento_dir = Path(bento_dir)
    manifest_path = bento_dir / "bento.yaml"
    if not manifest_path.is_file():
        raise ContainerBuildError(f"{bento_dir} is not a bento: it has no bento.yaml")
    manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ContainerBuildError(f"{manifest_path} is not a mapping")
    name, version = str(manifest.get("name", "")), str(manifest.get("version", ""))
    if not _BENTO_NAME.fullmatch(name) or not _BENTO_VERSION.fullmatch(version):
        raise ContainerBuildError(f"bento.yaml has an invalid name/version {name!r}:{version!r}")

    models: list[str] = []
    declared = list(manifest.get("models") or [])
    for service in manifest.get("services") or []:
        declared.extend((service or {}).get("models") or [])
    for entry in declared:
        model_tag = str(entry.get("tag") if isinstance(entry, dict) else entry)
        if isinstance(entry, dict) and entry.get("registry", "bentoml") != "bentoml":
            continue  # e.g. a Hugging Face model, fetched by the service itself
        model_name, _, model_version = model_tag.partition(":")
        if not (_BENTO_NAME.fullmatch(model_name) and _BENTO_VERSION.fullmatch(model_version)):
            raise ContainerBuildError(f"bento.yaml names an invalid model tag {model_tag!r}")
        model_dir = safe_join(bento_dir, "models", model_name, model_version)
        if not (model_dir / "model.yaml").is_file():
            raise ContainerBuildError(
                f"model {model_tag} is not inside the bento (no models/{model_name}/"
                f"{model_version}): build from `bentoml export` output, not the store folder"
            )
        if model_tag not in models:
            models.append(model_tag)

    image = manifest.get("image") or {}
    python_version = image.get("python_version") or (manifest.get("python") or {}).get(
        "python_version"
    )
    if python_version is not None:
        python_version = str(python_version)
        if not _PYTHON_MINOR.fullmatch(python_version):
            raise ContainerBuildError(f"bento.yaml has an invalid Python {python_version!r}")

    env_python = bento_dir / "env" / "python"
    requirements_file = next(
        (
            path
            for path in (env_python / "requirements.lock.txt", env_python / "requirements.txt")
            if path.is_file()
        ),
        None,
    )
    if requirements_file is None:
        raise ContainerBuildError(f"bento {name}:{version} has no env/python/requirements.txt")
    requirements = parse_requirements(requirements_file.read_text(encoding="utf-8"))
    if not any(_requirement_name(line) == "bentoml" for line in requirements):
        bentoml_version = str(manifest.get("bentoml_version", ""))
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)", bentoml_version):
            raise ContainerBuildError("the bento requires no bentoml and names no bentoml_version")
        requirements.append(f"bentoml=={bentoml_version}")
    return BentoInfo(
        name=name,
        version=version,
        python_version=python_version,
        requirements=tuple(requirements),
        models=tuple(models),
    )


def parse_requirements(text: str) -> list[str]:
    """The requirement lines of a pip requirements file, normalised, in file order.

    Source options (index URLs, find-links, trusted hosts) are dropped, since the image build
    installs from the wheelhouse only. Refused with :class:`ContainerBuildError`: any URL with
    credentials (it would end up in the image), other options (``-r``, ``-e``, ``-c``...), and
    direct references (URLs, local paths), which a wheelhouse cannot serve.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    if _URL_WITH_CREDENTIALS.search(text):
        raise ContainerBuildError(
            "the bento's requirements contain a URL with credentials; they would end up in the "
            "image. Configure the index outside the bento (pip.conf, PIP_INDEX_URL)."
        )
    requirements: list[str] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            option = re.split(r"[\s=]", line, maxsplit=1)[0]
            if option in _SOURCE_OPTIONS:
                continue
            raise ContainerBuildError(f"unsupported requirements option {line!r}")
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise ContainerBuildError(
                f"requirement {line!r} is not a plain package requirement ({exc}); local "
                "wheels and direct URLs cannot be served from the wheelhouse"
            ) from None
        if requirement.url:
            raise ContainerBuildError(f"direct reference {line!r} is not supported")
        normalised = str(requirement)
        if normalised not in requirements:
            requirements.append(normalised)
    if not requirements:
        raise ContainerBuildError("the bento's requirements list is empty")
    return requirements


def prepare_wheelhouse(
    requirements: Sequence[str],
    wheelhouse: Path,
    *,
    python_version: str,
    platform_tags: Sequence[str],
    progress: Progress | None = None,
) -> WheelSet:
    """Make sure ``wheelhouse`` holds wheels for ``requirements`` on the target; return them.

    Layout: ``pool/`` holds every wheel ever fetched (a wheel's file name fixes its content) and
    ``sets/<key>.json`` lists the files of one requirements set, keyed by a hash of the
    normalised requirements and the target. A known set costs nothing; a new one is first
    resolved from the pool alone (no network); only the wheels the pool lacks are then
    downloaded (see :func:`_resolve_wheel_set`). Serialised by a lock file.
    """
    say = progress or logger.info
    if not _PYTHON_MINOR.fullmatch(python_version):
        raise ValueError(f"invalid python_version {python_version!r}")
    platform_tags = list(platform_tags)
    if not platform_tags or not all(
        re.fullmatch(r"manylinux(_[0-9]+_[0-9]+|1|2010|2014)_(x86_64|aarch64)", tag)
        for tag in platform_tags
    ):
        raise ValueError(f"unsupported platform tags {platform_tags!r}")
    target: dict[str, Any] = {
        "implementation": "cp",
        "python_version": python_version,
        "abi": "cp" + python_version.replace(".", ""),
        "platforms": platform_tags,
    }
    normalised = sorted(set(requirements))
    key = hashlib.sha256(
        json.dumps({"requirements": normalised, "target": target}, sort_keys=True).encode()
    ).hexdigest()[:24]

    wheelhouse = Path(wheelhouse)
    pool, sets = wheelhouse / "pool", wheelhouse / "sets"
    pool.mkdir(parents=True, exist_ok=True)
    sets.mkdir(parents=True, exist_ok=True)
    manifest_path = sets / f"{key}.json"

    with _locked(wheelhouse / ".lock"):
        cached = _read_wheel_set(manifest_path, pool)
        if cached is not None:
            say(f"wheelhouse: set {key} cached ({len(cached)} wheels)")
            return WheelSet(key=key, pool=pool, files=cached, downloaded=0)

        started = time.monotonic()
        pool_before = {path.name for path in pool.iterdir()}
        with tempfile.TemporaryDirectory(prefix=".download-", dir=wheelhouse) as scratch:
            files = _resolve_wheel_set(normalised, Path(scratch), pool, target, key, say)
        downloaded = len({path.name for path in pool.iterdir()} - pool_before)
        atomic_write_json(
            manifest_path, {"files": files, "requirements": normalised, "target": target}
        )
        say(
            f"wheelhouse: set {key} ready ({len(files)} wheels, {downloaded} downloaded) "
            f"in {time.monotonic() - started:.1f} s"
        )
        return WheelSet(key=key, pool=pool, files=tuple(files), downloaded=downloaded)


def _resolve_wheel_set(
    requirements: list[str],
    scratch: Path,
    pool: Path,
    target: Mapping[str, Any],
    key: str,
    say: Progress,
) -> list[str]:
    """Resolve ``requirements`` into wheels in ``pool``, downloading as little as possible.

    1. from the pool alone (no network); 2. if every requirement is pinned (a locked bento),
    download just the pins with no compatible wheel in the pool (``--no-deps``) and resolve from
    the pool again; 3. otherwise, or if that still fails, resolve the whole set against the
    index. Returns the set's wheel file names, all present in ``pool``.
    """
    requirements_path = scratch / "requirements.txt"
    requirements_path.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")

    def attempt(reqs: Path, *, offline: bool, no_deps: bool = False) -> tuple[bool, str, Path]:
        dest = Path(tempfile.mkdtemp(prefix="wheels-", dir=scratch))
        result = _pip_download(reqs, dest, pool, target, offline=offline, no_deps=no_deps)
        return result.returncode == 0, result.stdout, dest

    ok, output, dest = attempt(requirements_path, offline=True)
    if not ok:
        missing = _missing_pins(requirements, pool, target)
        if missing:
            say(f"wheelhouse: set {key}: downloading {len(missing)} missing wheel(s)")
            missing_path = scratch / "missing.txt"
            missing_path.write_text("".join(f"{r}\n" for r in missing), encoding="utf-8")
            fetched_ok, output, fetched = attempt(missing_path, offline=False, no_deps=True)
            if fetched_ok:
                _move_into_pool(fetched, pool)
                ok, output, dest = attempt(requirements_path, offline=True)
    if not ok:
        say(f"wheelhouse: set {key}: resolving the whole set against the package index")
        ok, output, dest = attempt(requirements_path, offline=False)
        if not ok:
            raise ContainerBuildError(
                f"pip download of the bento's requirements for {target['abi']}/"
                f"{target['platforms'][0]} failed:\n{output[-4000:]}"
            )
    return _move_into_pool(dest, pool)


def _missing_pins(
    requirements: Sequence[str], pool: Path, target: Mapping[str, Any]
) -> list[str] | None:
    """The pinned requirements with no wheel in ``pool`` for the target; None if any is unpinned.

    Requirements whose environment marker excludes the target Python are ignored.
    """
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    python = tuple(int(part) for part in target["python_version"].split("."))
    supported = {
        *cpython_tags(python, abis=[target["abi"]], platforms=target["platforms"]),
        *compatible_tags(python, interpreter=target["abi"], platforms=target["platforms"]),
    }
    available: set[tuple[str, str]] = set()
    for path in pool.iterdir():
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if tags & supported:
            available.add((name, str(version)))

    missing: list[str] = []
    marker_env = {"python_version": target["python_version"], "implementation_name": "cpython"}
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(marker_env):
            continue
        pins = [spec.version for spec in requirement.specifier if spec.operator in ("==", "===")]
        if len(pins) != 1 or "*" in pins[0]:
            return None
        if (canonicalize_name(requirement.name), _canonical_version(pins[0])) not in available:
            missing.append(line)
    return missing


def _canonical_version(version: str) -> str:
    from packaging.version import InvalidVersion, Version

    try:
        return str(Version(version))
    except InvalidVersion:
        return version


def _move_into_pool(directory: Path, pool: Path) -> list[str]:
    """Move the wheels of ``directory`` into ``pool`` (keeping files already there); names."""
    names = sorted(path.name for path in directory.iterdir() if path.name.endswith(".whl"))
    for name in names:
        if not (pool / name).exists():
            os.replace(directory / name, pool / name)
    return names


def probe_base_image(client: DockerClient, base_image: str) -> BaseImageInfo:
    """Python version, glibc version and machine of ``base_image``.

    Runs ``python3`` in it once per image id (network none, container removed); later calls
    for the same image id are answered from memory.
    """
    import docker.errors

    image_id = client.images.get(validate_image_ref(base_image)).id
    if image_id in _BASE_IMAGE_PROBES:
        return _BASE_IMAGE_PROBES[image_id]
    try:
        output = client.containers.run(
            image_id,
            ["python3", "-c", _PROBE],
            network_mode=check_network_mode("none"),
            remove=True,
            stdout=True,
            stderr=True,
        )
    except docker.errors.ContainerError as exc:
        raise ContainerBuildError(f"base image {base_image} runs no python3: {exc}") from None
    data = json.loads(output.decode().strip().splitlines()[-1])
    if data.get("libc") != "glibc" or not re.fullmatch(r"[0-9]+\.[0-9]+", data["libc_version"]):
        raise ContainerBuildError(
            f"base image {base_image} has libc {data.get('libc')!r}: manylinux wheels need glibc"
        )
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(data["machine"], data["machine"])
    info = BaseImageInfo(
        python_version=data["python"], glibc_version=data["libc_version"], machine=machine
    )
    _BASE_IMAGE_PROBES[image_id] = info
    return info


_BASE_IMAGE_PROBES: dict[str, BaseImageInfo] = {}
_PROBE = (
    "import json, platform; libc, version = platform.libc_ver(); "
    "print(json.dumps({'python': platform.python_version(), 'libc': libc, "
    "'libc_version': version, 'machine': platform.machine()}))"
)


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


def _pip_command() -> list[str]:
    """A pip to download with: this interpreter's, else uv's ephemeral pip, else pip on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    uv = shutil.which("uv")
    if uv:
        return [uv, "tool", "run", "--quiet", "--from", "pip", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise ContainerBuildError("no pip found to prepare the wheelhouse (install pip or uv)")


def _pip_download(
    requirements: Path,
    dest: Path,
    pool: Path,
    target: Mapping[str, Any],
    *,
    offline: bool,
    no_deps: bool = False,
) -> subprocess.CompletedProcess[str]:
    command = [
        *_pip_command(),
        "download",
        *(["--no-index"] if offline else []),
        *(["--no-deps"] if no_deps else []),
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        "--implementation",
        target["implementation"],
        "--python-version",
        target["python_version"],
        "--abi",
        target["abi"],
        *(arg for tag in target["platforms"] for arg in ("--platform", tag)),
        "--find-links",
        str(pool),
        "--dest",
        str(dest),
        "-r",
        str(requirements),
    ]
    return subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        timeout=1800,
    )


def _read_wheel_set(manifest_path: Path, pool: Path) -> tuple[str, ...] | None:
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if not files or not all(
        isinstance(name, str) and "/" not in name and (pool / name).is_file() for name in files
    ):
        return None
    return tuple(files)


def _unpack_bento(source: Path, dest: Path) -> None:
    """Copy an exported bento folder, or safely extract a ``.bento``/tar archive, to ``dest``."""
    if source.is_dir():
        _check_symlinks(source)
        shutil.copytree(source, dest, symlinks=True)
        return
    if not source.is_file():
        raise ContainerBuildError(f"bento {source} does not exist")
    if not hasattr(tarfile, "data_filter"):
        raise ContainerBuildError("extracting a bento safely needs Python >= 3.11.4")
    try:
        with tarfile.open(source, "r:*") as archive:
            # The "data" filter refuses absolute paths, '..', links leaving the folder and
            # device files, and clears setuid and group/other write bits.
            archive.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ContainerBuildError(f"cannot extract bento archive {source}: {exc}") from None
    _check_symlinks(dest)


def _check_symlinks(root: Path) -> None:
    base = root.resolve()
    for path in root.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(base):
            raise ContainerBuildError(f"bento file {path} links outside the bento")


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
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"invalid image label key {key!r}")
        if not isinstance(value, str) or len(value) > 1024 or not value.isprintable():
            raise ValueError(f"invalid value for image label {key!r}")
        result[key] = value
    return result


def _requirement_name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-")


@contextmanager
def _build_directory(wheelhouse: Path) -> Iterator[Path]:
    """A scratch build context beside the wheel pool (so wheels are hard links, not copies)."""
    directory = Path(tempfile.mkdtemp(prefix=".build-", dir=wheelhouse))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
