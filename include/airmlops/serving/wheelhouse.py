"""The wheelhouse: the bento's locked requirements as wheels for the base image, on the host.

The image build has no network, so the service's requirements are downloaded beforehand as
cp3XY manylinux wheels into a cache shared by every build: ``pool/`` holds every wheel ever
fetched and ``sets/<key>.json`` lists the files of one requirements set. Only what is missing
is downloaded (see :func:`prepare_wheelhouse`); :func:`parse_requirements` refuses anything a
wheelhouse cannot serve or that would put credentials into the image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airmlops.paths import atomic_write_json, exclusive_lock
from airmlops.serving.build_common import PYTHON_MINOR_RE, ContainerBuildError, Progress

logger = logging.getLogger(__name__)

_URL_WITH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@]+@")
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


@dataclasses.dataclass(frozen=True)
class WheelSet:
    """The wheels satisfying one requirements set; ``downloaded`` counts files new to the cache."""

    key: str
    pool: Path
    files: tuple[str, ...]
    downloaded: int


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
    if not PYTHON_MINOR_RE.fullmatch(python_version):
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

    with exclusive_lock(wheelhouse / ".lock"):
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
        """One ``pip download`` into a fresh folder: (succeeded, output, folder)."""
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
    """``version`` in PEP 440 normal form (as is when it is not a valid version)."""
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
    """Run ``pip download`` of ``requirements`` for ``target`` into ``dest`` (pool: a source)."""
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
    """The files of a recorded set, or None if unrecorded, unreadable or a wheel is gone."""
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if not files or not all(
        isinstance(name, str) and "/" not in name and (pool / name).is_file() for name in files
    ):
        return None
    return tuple(files)
