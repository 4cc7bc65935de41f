"""An exported bento as the image build takes it: unpacked safely, then read and checked.

The bento comes from ``bentoml export`` (a ``.bento`` archive or its extracted folder): that is
the form that carries the models, under ``models/``; the bare store folder does not.
:func:`unpack_bento` refuses archive members and symlinks leaving the bento; :func:`read_bento`
returns its tag, Python version, locked requirements and models.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from airmlops.paths import safe_join
from airmlops.serving.build_common import PYTHON_MINOR_RE, ContainerBuildError
from airmlops.serving.wheelhouse import parse_requirements

_BENTO_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62}[a-z0-9])?$")
_BENTO_VERSION = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$")


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
        """``name:version``."""
        return f"{self.name}:{self.version}"


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
    models = _bundled_models(bento_dir, manifest)
    python_version = _python_version(manifest)
    requirements = _requirements(bento_dir, manifest, f"{name}:{version}")
    return BentoInfo(
        name=name,
        version=version,
        python_version=python_version,
        requirements=tuple(requirements),
        models=tuple(models),
    )


def _bundled_models(bento_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The BentoML models the bento declares (tags, each once), each checked to be inside it."""
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
    return models


def _python_version(manifest: dict[str, Any]) -> str | None:
    """The Python minor version the bento asks for (``image`` or legacy ``python``), if any."""
    image = manifest.get("image") or {}
    python_version = image.get("python_version") or (manifest.get("python") or {}).get(
        "python_version"
    )
    if python_version is None:
        return None
    python_version = str(python_version)
    if not PYTHON_MINOR_RE.fullmatch(python_version):
        raise ContainerBuildError(f"bento.yaml has an invalid Python {python_version!r}")
    return python_version


def _requirements(bento_dir: Path, manifest: dict[str, Any], tag: str) -> list[str]:
    """The bento's locked requirements, with ``bentoml`` pinned to its version if absent."""
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
        raise ContainerBuildError(f"bento {tag} has no env/python/requirements.txt")
    requirements = parse_requirements(requirements_file.read_text(encoding="utf-8"))
    if not any(_requirement_name(line) == "bentoml" for line in requirements):
        bentoml_version = str(manifest.get("bentoml_version", ""))
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)", bentoml_version):
            raise ContainerBuildError("the bento requires no bentoml and names no bentoml_version")
        requirements.append(f"bentoml=={bentoml_version}")
    return requirements


def unpack_bento(source: Path, dest: Path) -> None:
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
    """Refuse a bento holding a symlink that resolves outside ``root``."""
    base = root.resolve()
    for path in root.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(base):
            raise ContainerBuildError(f"bento file {path} links outside the bento")


def _requirement_name(line: str) -> str:
    """The project name of a requirement line, lowercase with ``-`` for ``_``."""
    return re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-")
