"""The spec a training run uses, pinned at ingest so an edit during the run changes nothing.

``ingest`` reads the spec file's bytes once, validates them and writes them, unchanged, to
``specs/<pipeline>/<spec_hash>.yaml`` under the data root (written once: the same validated
spec always has the same file; a spec given only in memory is pinned as its canonical JSON).
The run's :class:`~airmlops.contracts.Snapshot` records that path and the hash; every later
task of the run loads the pinned copy and checks it still validates to the recorded hash
(:func:`load_pinned`), whatever the spec file holds by then. Packaging copies the pinned file
into the bento, and refuses it when its hash differs from the one recorded on the model
version (:mod:`airmlops.serving.bento`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from airmlops.errors import NonRetryable
from airmlops.spec import PipelineSpec, load_spec, parse_spec_bytes, read_spec_bytes


class SpecHashMismatch(NonRetryable, ValueError):
    """A spec does not have the hash a run or a model version recorded; names both hashes."""

    def __init__(self, what: str, recorded: str, found: str, hint: str = "") -> None:
        super().__init__(f"{what}: spec hash {found} differs from the recorded {recorded}"
                         + (f"; {hint}" if hint else ""))
        self.recorded, self.found = recorded, found


@dataclass(frozen=True)
class PinnedSpec:
    """A validated spec, the pinned copy of its file and its hash."""

    spec: PipelineSpec
    path: Path
    spec_hash: str


def pinned_path(data_root: Path, pipeline: str, spec_hash: str) -> Path:
    """Where the spec of hash ``spec_hash`` is pinned: ``specs/<pipeline>/<hash>.yaml``."""
    from airmlops.paths import safe_join

    return safe_join(Path(data_root), "specs", pipeline, f"{spec_hash}.yaml")


def read_spec(spec_path: Path | str) -> tuple[PipelineSpec, bytes]:
    """The spec file read once: the validated spec and the very bytes it was validated from
    (what :func:`pin` stores), so an edit during the read cannot make them differ."""
    raw = read_spec_bytes(spec_path)
    return parse_spec_bytes(raw, spec_path), raw


def canonical_bytes(spec: PipelineSpec) -> bytes:
    """The validated spec as canonical JSON (valid YAML too): the pinned form of a spec that
    was not read from a file."""
    data = spec.model_dump(mode="json", by_alias=True)
    return (json.dumps(data, sort_keys=True, indent=1) + "\n").encode()


def pin(spec: PipelineSpec, data_root: Path, raw: bytes | None = None, *,
        data_roots: Sequence[Path] | None = None) -> PinnedSpec:
    """Pin ``spec`` under the data root: the file bytes ``raw`` it was read from, or its
    canonical JSON. Written once per spec hash; :class:`SpecHashMismatch` when ``raw`` does not
    validate to ``spec`` (with ``data_roots``, where its file paths may point, as when it was
    loaded)."""
    from airmlops.paths import atomic_write_bytes

    spec_hash = spec.spec_hash()
    content = canonical_bytes(spec) if raw is None else raw
    target = pinned_path(data_root, spec.name, spec_hash)
    if not target.is_file():
        found = parse_spec_bytes(content, target, data_roots=data_roots).spec_hash()
        if found != spec_hash:
            raise SpecHashMismatch(f"spec {spec.name}", spec_hash, found,
                                   "the bytes to pin are not the spec being run")
        atomic_write_bytes(target, content)
    return PinnedSpec(spec, target, spec_hash)


def load_pinned(path: Path | str, spec_hash: str, *,
                data_roots: Sequence[Path] | None = None) -> PipelineSpec:
    """The spec pinned at ``path``, checked to validate to ``spec_hash`` (the run's record)."""
    spec = load_spec(path, data_roots=data_roots)
    found = spec.spec_hash()
    if found != spec_hash:
        raise SpecHashMismatch(f"pinned spec {path}", spec_hash, found,
                               "the pinned copy was changed")
    return spec
