"""What passes between the training DAG's tasks: one frozen dataclass per stage result.

Each stage function (:mod:`airmlops.stages`) takes and returns these contracts; only the DAG
layer (:mod:`airmlops.dags`) turns them into XCom values (:meth:`Contract.to_xcom`) and back
(:meth:`Contract.from_xcom`). ``from_xcom`` checks every field: a missing or wrongly typed one
raises :class:`ContractError` naming the contract and the field, so a malformed value fails the
task that reads it with a clear message instead of a ``KeyError`` deep inside a stage.

The XCom keys are the field names (:class:`Snapshot` is a :class:`SnapshotRef`, the data
layer's handle of a stored batch, plus the run's pinned spec), as before the contracts existed:
tools and tests read them through Airflow's REST API. This module imports only the standard
library and :mod:`airmlops.names`, so the DAG layer can import it at parse time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from pathlib import Path
from typing import Any, Self

from airmlops.errors import NonRetryable
from airmlops.names import NAME_PATTERN, is_name


class ContractError(NonRetryable, ValueError):
    """A value between two tasks does not hold what its contract says; names which field."""

    def __init__(self, contract: str, field: str, problem: str) -> None:
        super().__init__(f"{contract}.{field}: {problem}")
        self.contract, self.field, self.problem = contract, field, problem


class Contract:
    """Base of the stage contracts: generic, checked conversion to and from XCom values.

    Supported field types: ``str``, ``int``, ``float`` (an int is accepted), ``bool``,
    ``dict[...]`` and ``list[...]`` (checked as a dict/list with JSON-ready content),
    ``datetime`` and ``date`` (ISO text in XCom), ``Path`` (text), another contract, ``Any``,
    and any of these ``| None``.
    """

    def to_xcom(self) -> dict[str, Any]:
        """The JSON-ready dict Airflow stores as the task's XCom value."""
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_xcom(cls, data: Any) -> Self:
        """The contract from an XCom value; :class:`ContractError` for a missing or wrongly
        typed field (extra keys are ignored: an older reader skips what it does not know)."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ContractError(cls.__name__, "(value)",
                                f"expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                if _has_default(field):
                    continue
                raise ContractError(cls.__name__, field.name, "is missing")
            values[field.name] = _load(cls.__name__, field.name, hints[field.name],
                                       data[field.name])
        made = cls(**values)
        made.check()
        return made

    def check(self) -> None:
        """Checks across fields or beyond types; raise :class:`ContractError`. None here."""


def _has_default(field: dataclasses.Field) -> bool:
    return (field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING)


def _dump(value: Any) -> Any:
    if isinstance(value, Contract):
        return value.to_xcom()
    if isinstance(value, dt.date):  # datetime is a date too
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _dump(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(item) for item in value]
    return value


_NAMES = {str: "text", int: "an integer", float: "a number", bool: "a boolean",
          dict: "a mapping", list: "a list"}


def _load(contract: str, field: str, hint: Any, value: Any) -> Any:
    """``value`` as type ``hint``, or :class:`ContractError` naming ``contract.field``."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        [inner] = [option for option in options if option is not type(None)]
        return _load(contract, field, inner, value)
    if origin is not None:  # dict[...] or list[...]: the container is checked
        hint = origin
    if isinstance(hint, type) and issubclass(hint, Contract):
        try:
            return hint.from_xcom(value)
        except ContractError as error:
            raise ContractError(contract, f"{field}.{error.field}", error.problem) from None
    if hint in (dt.datetime, dt.date):
        return _load_time(contract, field, hint, value)
    if hint is Path:
        return Path(_expect(contract, field, str, value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return _expect(contract, field, hint, value)


def _expect(contract: str, field: str, kind: type, value: Any) -> Any:
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ContractError(contract, field, f"expected {_NAMES.get(kind, kind.__name__)}, "
                                             f"got {type(value).__name__} {value!r:.80}")
    return value


def _load_time(contract: str, field: str, kind: type, value: Any) -> Any:
    text = _expect(contract, field, str, value)
    try:
        parsed = kind.fromisoformat(text)
    except ValueError:
        raise ContractError(contract, field, f"expected an ISO 8601 "
                                             f"{kind.__name__}, got {text!r:.80}") from None
    if kind is dt.datetime and parsed.utcoffset() is None:
        raise ContractError(contract, field, f"expected a time with its UTC offset, got {text!r}")
    return parsed


# --- the contracts, in the order of the training DAG ------------------------------------------


@dataclasses.dataclass(frozen=True)
class World(Contract):
    """A run's simulator world when it overrides the spec's (``scenario`` params)."""

    scenario: str | None = None
    scenario_start: dt.date | None = None


@dataclasses.dataclass(frozen=True)
class SnapshotRef(Contract):
    """Where one raw batch lives and what it holds (:mod:`airmlops.data.snapshots` writes and
    reads it); its content digest is the batch's data version."""

    pipeline: str
    digest: str
    path: Path
    rows: int
    interval_start: dt.datetime
    interval_end: dt.datetime
    created: bool = dataclasses.field(default=False, compare=False)
    """True only for the write that stored the file; not part of a ref's identity."""

    def check(self) -> None:
        if not is_name(self.pipeline):
            raise ContractError(type(self).__name__, "pipeline", f"invalid pipeline name "
                                f"{self.pipeline!r:.80} (expected {NAME_PATTERN})")
        _check_hex(type(self).__name__, "digest", self.digest, 64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Snapshot(SnapshotRef):
    """``ingest``: the batch's snapshot (a :class:`SnapshotRef`), the spec pinned for the run
    and, for a simulator run with overrides, its world.

    ``spec_hash``/``spec_path``: the hash of the validated spec and the copy of its file the
    run pinned at ingest (:mod:`airmlops.spec_pin`); every later task of the run uses it.
    """

    spec_hash: str
    spec_path: Path
    world: World | None = None

    @classmethod
    def of(cls, ref: SnapshotRef, spec_hash: str, spec_path: Path,
           world: World | None = None) -> Snapshot:
        """The contract of a written snapshot ``ref``."""
        return cls(**_ref_fields(ref), spec_hash=spec_hash, spec_path=Path(spec_path),
                   world=world)

    @property
    def ref(self) -> SnapshotRef:
        """The snapshot alone, as :mod:`airmlops.data.snapshots` writes it."""
        return SnapshotRef(**_ref_fields(self))

    def check(self) -> None:
        super().check()
        _check_hex(type(self).__name__, "spec_hash", self.spec_hash, 64)


def _ref_fields(ref: SnapshotRef) -> dict[str, Any]:
    """The :class:`SnapshotRef` fields of ``ref`` (a snapshot contract or a plain ref)."""
    return {field.name: getattr(ref, field.name) for field in dataclasses.fields(SnapshotRef)}


def _check_hex(contract: str, field: str, value: str, size: int) -> None:
    if len(value) != size or any(c not in "0123456789abcdef" for c in value):
        raise ContractError(contract, field, f"expected {size} hex digits, got {value!r:.80}")


@dataclasses.dataclass(frozen=True)
class DataCheck(Contract):
    """``validate_data``: the batch passed its data contract (a failure raises instead)."""

    success: bool
    digest: str
    statistics: dict[str, Any]
    reference_digest: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainingSet(Contract):
    """``preprocess``: the training set written for the snapshot, and its time split."""

    train_path: str
    test_path: str
    split: dict[str, Any]
    data_digest: str


@dataclasses.dataclass(frozen=True)
class TrainedModel(Contract):
    """``train``: the MLflow run and model, its held-out metrics, its data and lineage."""

    run_id: str
    model_uri: str
    metrics: dict[str, float]
    train_path: str
    test_path: str
    lineage: dict[str, str]


@dataclasses.dataclass(frozen=True)
class GateVerdict(Contract):
    """``validate_model``: whether the challenger is blessed, why, and every check."""

    blessed: bool
    reasons: list[str]
    checks: list[dict[str, Any]]
    primary_metric: str
    champion_version: str | None = None
    comparison: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class RegisteredVersion(Contract):
    """``register``: the new model version (alias ``challenger``), refit or not."""

    name: str
    version: str
    model_uri: str
    refit: bool = False


@dataclasses.dataclass(frozen=True)
class Package(Contract):
    """``containerize``: the bento of the version and, with a Docker engine, its image."""

    version: str
    bento_tag: str
    bento_export: str
    image_id: str | None = None
    image_tag: str | None = None


@dataclasses.dataclass(frozen=True)
class Deployment(Contract):
    """``deploy``: the version serving at the stable address, from which slot, and what it
    replaced (the serving version and the ``champion`` alias before the switch)."""

    version: str
    target: str
    slot: str
    stable_url: str
    previous_version: str | None = None
    previous_champion: str | None = None


@dataclasses.dataclass(frozen=True)
class MonitorResult(Contract):
    """``monitor``: the version baked and promoted to ``champion``; its reference data."""

    version: str
    bake: dict[str, Any]
    reference: str


@dataclasses.dataclass(frozen=True)
class FeatureBuild(Contract):
    """The features DAG's ``build_offline``: the days computed and the rows per view."""

    start: dt.date
    end: dt.date
    rows: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Materialized(Contract):
    """The features DAG's ``materialize``: rows copied per view, and to which store."""

    rows: dict[str, int]
    store: str


@dataclasses.dataclass(frozen=True)
class RolledBack(Contract):
    """The rollback DAG: the version serving again, and from which slot."""

    version: str
    slot: str
    stable_url: str
