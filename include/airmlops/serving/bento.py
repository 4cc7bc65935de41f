"""A bento from one registered MLflow model version, and the command that serves it.

:func:`build_bento` assembles a build context:

- ``model/``: the registered version's MLflow model directory (downloaded from
  ``models:/<name>/<version>``; checked before building by :mod:`airmlops.model_files`: its
  digests against those recorded on the version, skops format, trusted types);
- ``spec.yaml``: the pipeline spec file, byte for byte, and ``serving.json``: the model name,
  version, run id, the spec's hashes and the model's expected digests, which the service checks
  again when it loads the model (:class:`~airmlops.serving.service.ServingConfig`);
- ``airmlops/``: this package's source, so the service imports the same feature code as
  training without installing anything (the package is not on any index);
- ``bento_service.py``: a fixed entry module that calls
  :func:`airmlops.serving.service.create_service` on the ``serving.json`` beside it.

The bento is built in a fresh interpreter (BentoML reads ``BENTOML_HOME`` once, at import) with
``bentoml.bentos.build``, its requirements pinned to the exact versions installed here (the
whole dependency closure of the service's packages, so the image resolves nothing), then
exported as a ``.bento`` archive for the image builder (:mod:`airmlops.serving.container`).

The bento version is ``v<model version>-<digest>``, the digest covering every file of the
context and the requirements: the same model, spec and code give the same tag, and building it
again only reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airmlops.model_files import ModelDigests
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

SERVICE_PACKAGES = (
    "bentoml", "scikit-learn", "skops", "numpy", "scipy", "pandas", "pyarrow", "pydantic",
    "pydantic-settings", "pyyaml", "redis", "hiredis", "httptools",
)
"""What the service imports; their installed versions (and those of their dependencies) are
pinned in the bento. hiredis is redis-py's optional C reply parser: online reads of 100
entities take less than half the time with it (benchmarks/README.md). httptools is the HTTP
parser the service's request limits are built on (airmlops.serving.http_limits)."""
ENTRY_MODULE = "bento_service"
ENTRY_SOURCE = '''"""Entry module of a model bento, written by airmlops.serving.bento."""

from pathlib import Path

from airmlops.serving.service import CONFIG_FILE, create_service

ModelService = create_service(Path(__file__).resolve().parent / CONFIG_FILE)
'''
PACKAGE_SUFFIXES = (".py", ".json")
"""What of this package a bento carries: its source and its data (the estimator catalogue)."""
INCLUDE = [f"{ENTRY_MODULE}.py", "serving.json", "spec.yaml", "model/**",
           *(f"airmlops/**/*{suffix}" for suffix in PACKAGE_SUFFIXES)]

_VERSION = re.compile(r"^[0-9]{1,9}$")
_BENTO_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62}[a-z0-9])?$")
_BENTO_TAG = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62}[a-z0-9])?:[a-z0-9](?:[a-z0-9_.-]{0,126}"
                        r"[a-z0-9])?$")
_TAG_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,249}$")
_BUILD_TIMEOUT_S = 600


class BentoBuildError(RuntimeError):
    """The model version cannot be served or the bento build failed; says which and why."""


@dataclasses.dataclass(frozen=True)
class BentoRef:
    """A built bento: its tag, its folder in the BentoML store, and its exported archive."""

    tag: str
    path: Path
    export_path: Path

    def to_dict(self) -> dict[str, str]:
        return {"tag": self.tag, "path": str(self.path), "export_path": str(self.export_path)}


_PYTHONS = ({}, {"python_full_version": "3.11.0"})


def service_requirements(packages: tuple[str, ...] = SERVICE_PACKAGES) -> list[str]:
    """``name==version`` of ``packages`` and everything they need, as installed here.

    Dependencies are followed through their markers (evaluated for this interpreter) and the
    extras asked for, so the list is the closure a clean environment needs.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str], str]] = [(p, frozenset(), "the service")
                                                    for p in packages]
    while todo:
        name, extras, wanted_by = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BentoBuildError(f"package {name!r} (needed by {wanted_by}) is not installed"
                                  ) from None
        project = dist.metadata["Name"]
        pins[canonicalize_name(project)] = f"{project}=={dist.version}"
        for line in dist.requires or []:
            requirement = Requirement(line)
            # Images may run an older 3.11 patch release than this interpreter (Debian
            # bookworm has 3.11.2), so a dependency needed by any 3.11 is kept.
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra, **python})
                for extra in (extras or {""}) for python in _PYTHONS
            ):
                continue
            todo.append((requirement.name, frozenset(requirement.extras), project))
    return [pins[name] for name in sorted(pins)]


def _bento_name(spec: PipelineSpec) -> str:
    name = spec.name.replace("_", "-")
    if not _BENTO_NAME.fullmatch(name):
        raise ValueError(f"pipeline name {spec.name!r} does not make a valid bento name")
    return name


def _check_features_hash(spec: PipelineSpec, version: Any) -> None:
    """The spec's feature definitions must be those the version was trained with."""
    trained = (version.tags or {}).get("features_hash")
    if trained and trained != spec.features_hash():
        raise BentoBuildError(
            f"model {version.name} version {version.version} was trained with feature "
            f"definitions {trained[:12]}, but the spec now defines {spec.features_hash()[:12]}: "
            "serving it would compute different inputs than it was trained on")


def _check_spec_hash(spec: PipelineSpec, version: Any) -> None:
    """The spec must be the one the version was trained with (its ``spec_hash`` lineage tag):
    a bento carries the spec, and the service computes its inputs and answers from it."""
    from airmlops.spec_pin import SpecHashMismatch

    trained = (version.tags or {}).get("spec_hash")
    if trained and trained != spec.spec_hash():
        raise SpecHashMismatch(
            f"model {version.name} version {version.version}", trained, spec.spec_hash(),
            "refusing to package it with a spec it was not trained with (package the spec "
            "pinned by its training run, or train again)")


def _package_source(destination: Path) -> None:
    """Copy this package's Python source and data files (no caches) to ``destination``."""
    import airmlops

    source = Path(airmlops.__file__).resolve().parent
    for path in sorted(p for suffix in PACKAGE_SUFFIXES for p in source.rglob(f"*{suffix}")):
        relative = path.relative_to(source)
        if "__pycache__" in relative.parts:
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _context_digest(context: Path, requirements: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        relative = path.relative_to(context).as_posix()
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update("\n".join(requirements).encode())
    return digest.hexdigest()


def build_bento(
    spec: PipelineSpec,
    version: str,
    tracking_uri: str,
    bentoml_home: Path,
    *,
    spec_path: Path,
    export_dir: Path | None = None,
) -> BentoRef:
    """Build (or reuse) the bento of model version ``version`` of ``spec``'s registered model.

    ``spec_path`` is the spec file copied into the bento (it must validate to ``spec``);
    ``bentoml_home`` is the BentoML store; the exported archive goes to ``export_dir``
    (default ``<bentoml_home>/exports``). Raises :class:`BentoBuildError` when the version is
    not a skops scikit-learn model, was trained with other feature definitions, or the build
    fails; :class:`~airmlops.spec_pin.SpecHashMismatch` when the version's ``spec_hash`` tag is
    not the hash of ``spec``.
    """
    from mlflow import MlflowClient

    from airmlops.spec import load_spec

    version = str(version)
    if not _VERSION.fullmatch(version):
        raise ValueError(f"model version must be a number, got {version!r}")
    if load_spec(spec_path).spec_hash() != spec.spec_hash():
        raise ValueError(f"{spec_path} does not hold the spec being served")
    name = spec.registered_model_name
    bento_name = _bento_name(spec)
    bentoml_home = Path(bentoml_home).resolve()
    export_dir = Path(export_dir).resolve() if export_dir else bentoml_home / "exports"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    model_version = client.get_model_version(name, version)
    _check_features_hash(spec, model_version)
    _check_spec_hash(spec, model_version)
    requirements = service_requirements()

    scratch = bentoml_home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    context = Path(tempfile.mkdtemp(prefix="bento-context-", dir=scratch))
    try:
        _fill_context(context, spec, spec_path, version, model_version, tracking_uri)
        bento_version = f"v{version}-{_context_digest(context, requirements)[:12]}"
        tag = f"{bento_name}:{bento_version}"
        export_path = export_dir / f"{bento_name}-{bento_version}.bento"
        store_path = bentoml_home / "bentos" / bento_name / bento_version
        if (store_path / "bento.yaml").is_file() and export_path.is_file():
            log.info("bento %s already built and exported: reused", tag)
            return BentoRef(tag=tag, path=store_path, export_path=export_path)
        result = _run_build(context, bento_name, bento_version, requirements, export_path,
                            bentoml_home, labels={"pipeline": spec.name, "model_name": name,
                                                  "model_version": version})
    finally:
        shutil.rmtree(context, ignore_errors=True)
    ref = BentoRef(tag=result["tag"], path=Path(result["path"]),
                   export_path=Path(result["export_path"]))
    log.info("bento %s built from %s version %s; exported to %s", ref.tag, name, version,
             ref.export_path)
    return ref


def _fill_context(context: Path, spec: PipelineSpec, spec_path: Path, version: str,
                  model_version: Any, tracking_uri: str) -> None:
    """Write the build context of ``version`` (its registry entry ``model_version``): the
    checked model, the spec, the serving config, the entry module and the platform's source."""
    from airmlops.serving.service import CONFIG_FILE, ServingConfig

    name = spec.registered_model_name
    model_uri = f"models:/{name}/{version}"
    digests = _download_model(context / "model", model_uri, model_version, tracking_uri)
    shutil.copyfile(spec_path, context / "spec.yaml")
    config = ServingConfig(
        pipeline=spec.name, model_name=name, model_version=version,
        run_id=model_version.run_id, model_uri=model_uri, spec_hash=spec.spec_hash(),
        features_hash=spec.features_hash(), **digests.to_tags(),
    )
    (context / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
    (context / f"{ENTRY_MODULE}.py").write_text(ENTRY_SOURCE)
    _package_source(context / "airmlops")


def _download_model(destination: Path, model_uri: str, model_version: Any,
                    tracking_uri: str) -> ModelDigests:
    """Download ``model_uri`` to the directory ``destination`` and check its files against
    the digests the version is tagged with; BentoBuildError if it cannot be served."""
    import mlflow

    from airmlops.model_files import ModelDigests, ModelLoadError, check_model_dir
    from airmlops.training.tracking import using_tracking_uri

    with using_tracking_uri(tracking_uri):
        downloaded = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=str(destination),
            tracking_uri=tracking_uri, registry_uri=tracking_uri))
    if downloaded.resolve() != destination.resolve():
        raise BentoBuildError(f"{model_uri} downloaded to {downloaded}, not a directory")
    try:
        digests = ModelDigests.from_tags(model_version.tags, model_uri)
        check_model_dir(destination, digests)
    except ModelLoadError as error:
        raise BentoBuildError(f"{model_uri} cannot be served: {error}") from None
    return digests


def _run_build(context: Path, bento_name: str, bento_version: str, requirements: list[str],
               export_path: Path, bentoml_home: Path, labels: dict[str, str]) -> dict[str, str]:
    """Run :func:`_build_in_this_process` in a fresh interpreter with ``BENTOML_HOME`` set."""
    job = context.parent / f"{context.name}.job.json"
    job.write_text(json.dumps({
        "context": str(context), "name": bento_name, "version": bento_version,
        "requirements": requirements, "export_path": str(export_path), "labels": labels,
    }))
    from airmlops.processes import BENTO_BUILD, child_env

    env = child_env(BENTO_BUILD, {"BENTOML_HOME": str(bentoml_home)})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "airmlops.serving.bento", str(job)],
            cwd=context, env=env, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BentoBuildError(f"bento build timed out after {_BUILD_TIMEOUT_S} s") from None
    finally:
        job.unlink(missing_ok=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        output = (done.stdout + done.stderr)[-4000:]
        raise BentoBuildError(f"bento build of {bento_name}:{bento_version} failed:\n{output}")
    return json.loads(lines[-1])


def _build_in_this_process(job: dict[str, Any]) -> dict[str, str]:
    import bentoml

    tag = f"{job['name']}:{job['version']}"
    try:
        bento = bentoml.bentos.get(tag)
    except bentoml.exceptions.NotFound:
        bento = bentoml.bentos.build(
            f"{ENTRY_MODULE}:ModelService",
            name=job["name"],
            version=job["version"],
            labels=job["labels"],
            description=f"Model service of {job['labels']['model_name']} version "
            f"{job['labels']['model_version']} (built by airmlops)",
            include=INCLUDE,
            python={"packages": job["requirements"], "lock_packages": False},
            build_ctx=job["context"],
        )
    export_path = Path(job["export_path"])
    export_path.parent.mkdir(parents=True, exist_ok=True)
    if not export_path.is_file():
        partial = export_path.with_name(f".{export_path.stem}.{os.getpid()}.partial.bento")
        written = bentoml.bentos.export_bento(bento.tag, str(partial))
        os.replace(written, export_path)
    return {"tag": str(bento.tag), "path": str(Path(bento.path).resolve()),
            "export_path": str(export_path)}


def serve_command(bento: str | Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The argument list that serves ``bento`` (a ``name:version`` tag or a bento folder) on
    ``host:port`` with this environment's BentoML (the ``process`` deploy target)."""
    text = str(bento)
    if not _BENTO_TAG.fullmatch(text):
        path = Path(text)
        if not (path / "bento.yaml").is_file():
            raise ValueError(f"{text!r} is neither a name:version bento tag nor a bento folder")
        text = str(path.resolve())
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    if not re.fullmatch(r"[0-9.]{7,15}|localhost|::1|\[::1\]", host):
        raise ValueError(f"invalid host {host!r}")
    return [sys.executable, "-m", "bentoml", "serve", text, "--host", host, "--port", str(port)]


def record_on_version(name: str, version: str, tracking_uri: str, **tags: str | None) -> None:
    """Set tags (``bento_tag``, later ``image_id``...) on model version ``version``.

    A None value is skipped; keys must be simple names.
    """
    from mlflow import MlflowClient

    version = str(version)
    if not _VERSION.fullmatch(version):
        raise ValueError(f"model version must be a number, got {version!r}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for key, value in tags.items():
        if not _TAG_KEY.fullmatch(key):
            raise ValueError(f"invalid tag name {key!r}")
        if value is not None:
            client.set_model_version_tag(name, version, key, str(value))


def main(argv: list[str]) -> None:
    """``python -m airmlops.serving.bento JOB.json``: build and export (see :func:`_run_build`);
    prints the result as JSON on the last line."""
    job = json.loads(Path(argv[0]).read_text())
    result = _build_in_this_process(job)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

