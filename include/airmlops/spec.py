"""The pipeline spec: one YAML file per model under ``include/pipelines/``.

A spec says where the data comes from, which columns are the entity key, the event time, the
label and the features, which estimator to train, which gates a model must pass and how it is
monitored and deployed. Adding a model to the platform means adding a spec; no code.

:func:`load_spec` validates a file and raises :class:`SpecError` naming the file, the field and
what was expected. Loading is cheap (no heavy imports), so the DAG factory can call it at parse
time; :func:`resolve_estimator` does the expensive check of the estimator class. Reading a
file as untrusted YAML, and wording pydantic's errors, is :mod:`airmlops.spec_parsing`, whose
public names are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from airmlops import estimators
from airmlops.alerts import AlertsConfig, one_line
from airmlops.features.definitions import FeatureSet
from airmlops.monitoring.config import MonitoringConfig, validate_against_spec
from airmlops.names import COLUMN_PATTERN, NAME_PATTERN
from airmlops.paths import confine_pattern
from airmlops.schedules import check_schedule
from airmlops.spec_deploy import DeployConfig, ResourceLimits
from airmlops.spec_parsing import (
    SpecError,
    load_spec_yaml,
    read_spec_bytes,
    spec_paths,
    validation_problems,
)

__all__ = [
    "ESTIMATOR_KIND", "ESTIMATOR_PATTERN", "HIGHER_IS_BETTER", "METRICS_BY_TASK", "NAME_PATTERN",
    "ChampionComparison", "Column", "DeployConfig", "EstimatorConfig", "FeatureColumn",
    "FeatureStoreConfig", "FileSource", "Gates", "PipelineSpec", "ResourceLimits",
    "SimulatorSource", "Source", "SpecError", "SqlSource", "TrainingConfig", "load_spec",
    "parse_spec", "parse_spec_bytes", "read_spec_bytes", "resolve_estimator", "spec_paths",
]

ESTIMATOR_PATTERN = r"^sklearn(\.[a-z_][a-z0-9_]*)+\.[A-Z][A-Za-z0-9]*$"
"""Only scikit-learn estimators: a spec must not be able to import arbitrary code."""
ESTIMATOR_KIND = {"binary_classification": "classifier", "regression": "regressor"}

Column = Annotated[str, Field(pattern=COLUMN_PATTERN)]

HIGHER_IS_BETTER = {"roc_auc": True, "accuracy": True, "f1": True, "precision": True,
                    "recall": True, "log_loss": False, "r2": True, "mae": False, "rmse": False}
METRICS_BY_TASK = {
    "binary_classification": ("roc_auc", "accuracy", "f1", "precision", "recall", "log_loss"),
    "regression": ("mae", "rmse", "r2"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _confined(value: str, info: ValidationInfo) -> str:
    """A spec path or glob, checked against the data roots given as validation context."""
    roots = (info.context or {}).get("data_roots")
    if roots is None:
        from airmlops.settings import get_settings

        roots = get_settings().data_roots
    try:
        return confine_pattern(value, roots, field="path")
    except ValueError as error:
        raise ValueError(str(error).removeprefix("path: ")) from None


class SimulatorSource(_Strict):
    """The built-in subscription-business simulator (deterministic for a seed)."""

    kind: Literal["simulator"]
    seed: int = 7
    customers: int = Field(default=2000, ge=10, le=5_000_000)
    scenario: Literal["stable", "covariate_drift", "concept_drift", "covariate_and_concept_drift",
                      "data_quality"] = "stable"
    scenario_start: dt.date | None = Field(
        default=None, description="First day the scenario applies; before it the data is stable."
    )
    label_delay_days: int = Field(default=30, ge=0, le=365)


class FileSource(_Strict):
    """CSV or Parquet files: one path or a glob, relative paths under the data root."""

    kind: Literal["file"]
    path: str = Field(min_length=1)
    format: Literal["csv", "parquet"] | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_data_roots(cls, value: str, info: ValidationInfo) -> str:
        return _confined(value, info)


class SqlSource(_Strict):
    """A SQL query through an Airflow connection.

    The query is parameterised: it must use the named parameters ``%(start)s`` and ``%(end)s``
    (or ``:start``/``:end``), which the platform binds to the run's data interval.
    """

    kind: Literal["sql"]
    conn_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,250}$")
    query: str = Field(min_length=1)

    @field_validator("query")
    @classmethod
    def _uses_interval_parameters(cls, value: str) -> str:
        if not re.search(r"(%\(start\)s|:start\b)", value) or not re.search(
            r"(%\(end\)s|:end\b)", value
        ):
            raise ValueError("must bind the data interval as %(start)s and %(end)s parameters")
        return value


Source = Annotated[SimulatorSource | FileSource | SqlSource, Field(discriminator="kind")]


class FeatureColumn(_Strict):
    """One model input column and what valid values look like.

    A ``boolean`` feature is a categorical one whose categories are always "true" and "false"
    (:mod:`airmlops.data.categories`): True/False, "true"/"false" in any case and 1/0 all count.
    Declared ``values`` are kept in that canonical text, so ``["True", "False"]`` means
    "true"/"false" and ``[1, 2]`` means "1"/"2".
    """

    name: Column
    type: Literal["numeric", "categorical", "boolean"]
    min: float | None = None
    max: float | None = None
    values: list[str] | None = Field(default=None, description="Allowed categories.")
    max_null_fraction: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("min", "max")
    @classmethod
    def _no_bounds_on_booleans(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("type") == "boolean":
            raise ValueError("a boolean feature takes no min/max (it is true or false)")
        return value

    @field_validator("values", mode="before")
    @classmethod
    def _canonical_values(cls, value: Any, info: ValidationInfo) -> Any:
        """Categories as their canonical text; strings, integers and booleans are accepted."""
        if value is None:
            return None
        if info.data.get("type") == "boolean":
            raise ValueError("a boolean feature takes no values (they are always true and false)")
        if not isinstance(value, list):
            return value  # pydantic reports that a list was expected
        from airmlops.data.categories import category

        texts = [category(item) if isinstance(item, str | int) else item for item in value]
        if all(isinstance(text, str) for text in texts):
            return list(dict.fromkeys(texts))  # "True" and "true" are one category
        return texts  # pydantic names the item that is not a category

    @model_validator(mode="after")
    def _bounds_fit_type(self) -> FeatureColumn:
        if self.type != "numeric" and (self.min is not None or self.max is not None):
            raise ValueError("min/max apply to numeric features only")
        if self.type == "numeric" and self.values is not None:
            raise ValueError("values apply to categorical features only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class TrainingConfig(_Strict):
    window_days: int = Field(default=120, ge=1, le=36500,
                             description="History pulled for one training run.")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    gap_days: int = Field(default=0, ge=0, le=365,
                          description="Embargo between train and test (the label horizon).")
    min_rows: int = Field(default=200, ge=10)
    refit: bool | None = Field(
        default=None,
        description="After the gates bless the challenger on the held-out (most recent) rows, "
        "fit the same estimator again on every labelled row of the batch (train, embargoed and "
        "held-out) and register that fit; the gate numbers stay those of the held-out fit. "
        "Unset: only in retraining runs triggered by the monitoring policy (Airflow run id "
        "retrain__<window_id>). true: every run. false: never (the deployed model is exactly "
        "the one the gates measured; use it when the newest labels are not final yet).",
    )


class EstimatorConfig(_Strict):
    class_path: str
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 42

    @field_validator("class_path")
    @classmethod
    def _is_a_sklearn_estimator(cls, value: str) -> str:
        if not re.match(ESTIMATOR_PATTERN, value) or value not in estimators.catalog():
            names = sorted({path.rpartition(".")[2] for path in estimators.catalog()})
            close = difflib.get_close_matches(value.rpartition(".")[2], names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                "expected a scikit-learn classifier or regressor listed by "
                "sklearn.utils.all_estimators, such as 'sklearn.linear_model.LogisticRegression'"
                + hint
            )
        return value


class ChampionComparison(_Strict):
    max_regression: float = Field(
        default=0.0, ge=0.0,
        description="The challenger is blessed when the lower confidence bound of "
        "(challenger - champion) on the primary metric is at least -max_regression.",
    )
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    n_bootstrap: int = Field(default=1000, ge=100, le=100_000)
    recent_days: int | None = Field(
        default=None, ge=1, description="Compare on the last N days of the held-out set only."
    )


class Gates(_Strict):
    primary_metric: str
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Absolute bounds: a minimum for higher-is-better metrics, a maximum otherwise.",
    )
    champion: ChampionComparison = Field(default_factory=ChampionComparison)


class FeatureStoreConfig(FeatureSet):
    """Feature views, request fields and on-demand features of a pipeline (see README).

    ``events`` views aggregate the source's activity events and ``profiles`` views keep the
    latest profile attributes; the simulator provides both. ``schedule`` drives the
    ``<name>_features`` DAG, which also runs whenever the training DAG ingests a snapshot.
    """

    schedule: str | None = "@daily"

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return value if value is None else check_schedule(value)

    @field_validator("events_path", "profiles_path")
    @classmethod
    def _inside_the_data_roots(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value is None else _confined(value, info)

    backfill_days: int = Field(default=150, ge=1, le=3650,
                               description="Days computed on the first run of an empty store.")
    events_path: str | None = Field(
        default=None, description="CSV/Parquet glob of events for non-simulator sources.")
    profiles_path: str | None = Field(
        default=None, description="CSV/Parquet glob of profiles for non-simulator sources.")
    offline_engine: Literal["memory", "duckdb"] = Field(
        default="memory",
        # The default is left out of dumps so the hashes of specs without the field stay put.
        exclude_if=lambda engine: engine == "memory",
        description="The point-in-time join of training sets: 'memory' (numpy, the fastest "
        "while the join fits in memory) or 'duckdb' (spills to disk under the data root).")


class PipelineSpec(_Strict):
    """One model's pipeline."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    owner: str = "mlops"
    schedule: str | None = Field(default=None, description="Cron or preset; null = triggered only.")
    start_date: dt.date = dt.date(2026, 1, 1)
    task: Literal["binary_classification", "regression"]
    source: Source
    entity_key: Column
    timestamp: Column
    label: Column
    features: list[FeatureColumn] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    estimator: EstimatorConfig
    gates: Gates
    tags: list[str] = Field(default_factory=list)
    feature_store: FeatureStoreConfig | None = Field(
        default=None, description="Feature views and on-demand features; without it the model "
        "reads the raw feature columns of each row.",
    )
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    alerts: AlertsConfig | None = Field(
        default=None, description="Where alerts go (SMTP and/or a webhook); none = no alerts.")
    model_inputs: list[Column] | None = Field(
        default=None, description="The model's input columns; default: every feature-store "
        "feature plus the request fields that are declared features, or, without a feature "
        "store, every declared feature.",
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return value if value is None else check_schedule(value)

    @model_validator(mode="after")
    def _estimator_fits_the_task(self) -> PipelineSpec:
        entry = estimators.catalog()[self.estimator.class_path]
        kind = ESTIMATOR_KIND[self.task]
        if kind not in entry["kinds"]:
            raise ValueError(f"estimator.class_path: '{self.estimator.class_path}' is not a "
                             f"{kind} (task is {self.task})")
        for name in self.estimator.params:
            if name not in entry["params"]:
                raise ValueError(f"estimator.params.{name}: not a parameter of "
                                 f"{self.estimator.class_path.rpartition('.')[2]}; expected any "
                                 f"of {entry['params']}")
        return self

    @model_validator(mode="after")
    def _columns_are_consistent(self) -> PipelineSpec:
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"features: duplicated names {duplicated}")
        special = {"entity_key": self.entity_key, "timestamp": self.timestamp, "label": self.label}
        for field_name, column in special.items():
            if column in names:
                raise ValueError(f"{field_name} '{column}' must not also be a feature")
        metrics = METRICS_BY_TASK[self.task]
        if self.gates.primary_metric not in metrics:
            raise ValueError(
                f"gates.primary_metric: '{self.gates.primary_metric}' is not a {self.task} "
                f"metric; expected one of {list(metrics)}"
            )
        unknown = sorted(set(self.gates.thresholds) - set(metrics))
        if unknown:
            raise ValueError(
                f"gates.thresholds: unknown metric(s) {unknown}; expected any of {list(metrics)}"
            )
        store = self.feature_store
        if store is not None:
            if store.views and self.source.kind != "simulator":
                needs = {v.source for v in store.views}
                if "events" in needs and not store.events_path:
                    raise ValueError("feature_store.events_path: required for events views "
                                     "unless the source is the simulator")
                if "profiles" in needs and not store.profiles_path:
                    raise ValueError("feature_store.profiles_path: required for profiles views "
                                     "unless the source is the simulator")
            keys = {e.join_key for e in store.entities}
            if keys != {self.entity_key}:
                raise ValueError(f"feature_store.entities: join keys {sorted(keys)} must be the "
                                 f"entity_key '{self.entity_key}'")
            names = set(self.feature_names)
            raw = [f for f in store.request_fields if f not in names and f != self.timestamp]
            if raw:
                raise ValueError(f"feature_store.request_fields: {raw} are not declared features")
        if self.model_inputs is not None:
            unknown = sorted(set(self.model_inputs) - set(self._input_types_of_everything()))
            if unknown:
                raise ValueError(f"model_inputs: unknown column(s) {unknown}")
        validate_against_spec(self.monitoring, self)
        return self

    @property
    def feature_names(self) -> list[str]:
        """The declared raw feature columns of a batch (validated by validate_data)."""
        return [f.name for f in self.features]

    def _input_types_of_everything(self) -> dict[str, str]:
        types = {f.name: f.type for f in self.features}
        if self.feature_store is None:
            return types
        available = {n: t for n, t in types.items() if n in self.feature_store.request_fields}
        for view in self.feature_store.views:
            if view.source == "profiles":
                for column, name in zip(view.columns, view.feature_names, strict=True):
                    available[name] = types.get(column, "numeric")
            else:
                available.update(dict.fromkeys(view.feature_names, "numeric"))
        for feature in self.feature_store.on_demand:
            available[feature.name] = feature.type
        return available

    @property
    def input_types(self) -> dict[str, str]:
        """The model's input columns, in order, with their type (numeric or categorical).

        A boolean feature is categorical here: the model one-hot encodes it and drift tests it
        like any category (:attr:`boolean_features` says which ones are boolean).
        """
        everything = self._input_types_of_everything()
        names = self.model_inputs if self.model_inputs is not None else list(everything)
        return {name: "categorical" if everything[name] == "boolean" else everything[name]
                for name in names}

    @property
    def boolean_features(self) -> list[str]:
        """The model inputs declared ``type: boolean`` (their categories are "true"/"false")."""
        everything = self._input_types_of_everything()
        names = self.model_inputs if self.model_inputs is not None else list(everything)
        return [name for name in names if everything[name] == "boolean"]

    @property
    def input_names(self) -> list[str]:
        return list(self.input_types)

    @property
    def numeric_features(self) -> list[str]:
        return [n for n, t in self.input_types.items() if t == "numeric"]

    @property
    def categorical_features(self) -> list[str]:
        return [n for n, t in self.input_types.items() if t == "categorical"]

    @property
    def request_fields(self) -> list[str]:
        """What a prediction request carries besides the entity key."""
        if self.feature_store is None:
            return self.feature_names
        return list(self.feature_store.request_fields)

    @property
    def required_columns(self) -> list[str]:
        return [self.entity_key, self.timestamp, self.label, *self.feature_names]

    @property
    def training_dag_id(self) -> str:
        return f"{self.name}_training"

    @property
    def rollback_dag_id(self) -> str:
        return f"{self.name}_rollback"

    @property
    def monitoring_dag_id(self) -> str:
        return f"{self.name}_monitoring"

    @property
    def registered_model_name(self) -> str:
        return self.name

    def spec_hash(self) -> str:
        """A digest of the validated spec (not of its formatting), recorded in lineage."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def features_hash(self) -> str:
        """A digest of the feature definitions (and of the on-demand code they run)."""
        parts = {
            "columns": [f.model_dump(mode="json") for f in self.features],
            "store": self.feature_store.definitions_hash() if self.feature_store else None,
            "inputs": self.input_names,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @property
    def features_dag_id(self) -> str:
        return f"{self.name}_features"


def parse_spec(data: Any, path: Path | str = "<memory>", *,
               data_roots: Sequence[Path] | None = None) -> PipelineSpec:
    """Validate a spec given as a mapping; raise :class:`SpecError` on any bad field.

    ``data_roots`` are where file paths may point (default: the settings' data roots).
    """
    if not isinstance(data, dict):
        raise SpecError(path, [("(top level)", "expected a mapping of fields")])
    context = {"data_roots": data_roots} if data_roots is not None else None
    try:
        return PipelineSpec.model_validate(data, context=context)
    except ValidationError as error:
        raise SpecError(path, validation_problems(error, PipelineSpec.model_fields)) from None
    except Exception as error:  # a validator's own bug must still name the spec
        raise SpecError(path, [("(top level)", f"cannot be validated: "
                                               f"{type(error).__name__}")]) from None


def load_spec(path: Path | str, *, data_roots: Sequence[Path] | None = None) -> PipelineSpec:
    """Read and validate one spec file; any failure is a :class:`SpecError` naming the file.

    The file is treated as untrusted data (:mod:`airmlops.spec_parsing`): at most
    ``MAX_SPEC_BYTES``, UTF-8, plain YAML (no tags beyond the standard ones, no anchors or
    aliases, at most ``MAX_NESTING`` levels deep).
    """
    return parse_spec_bytes(read_spec_bytes(path), path, data_roots=data_roots)


def parse_spec_bytes(raw: bytes, path: Path | str = "<memory>", *,
                     data_roots: Sequence[Path] | None = None) -> PipelineSpec:
    """Validate a spec given as the bytes of its file (see :func:`load_spec`); ``path`` only
    names it in errors. A run pins these bytes (:mod:`airmlops.spec_pin`)."""
    path = Path(path)
    return parse_spec(load_spec_yaml(raw, path), path, data_roots=data_roots)


def resolve_estimator(spec: PipelineSpec, path: Path | str = "<memory>") -> type:
    """The estimator class of ``spec``, checked against scikit-learn before anything is built.

    The class must be, by identity, one of the estimators ``sklearn.utils.all_estimators`` lists
    for the spec's task; every param must be a parameter of its ``__init__``; then one instance
    is made and its params validated by scikit-learn. Raises :class:`SpecError` otherwise. This
    imports scikit-learn, so it runs inside tasks and in ``airmlops spec check``, not at DAG
    parse time.
    """
    kind = ESTIMATOR_KIND[spec.task]
    class_path = spec.estimator.class_path
    estimator = estimators.resolve(class_path, kind)
    if estimator is None:
        raise SpecError(path, [("estimator.class_path", f"'{class_path}' is not a scikit-learn "
                                f"{kind} listed by sklearn.utils.all_estimators (task is "
                                f"{spec.task})")])
    known = estimators.init_params(estimator)
    for name in spec.estimator.params:
        if name not in known:
            raise SpecError(path, [(f"estimator.params.{name}", f"not a parameter of "
                                    f"{estimator.__name__}; expected any of {known}")])
    try:
        instance = estimator(**spec.estimator.params)
        validate = getattr(instance, "_validate_params", None)
        if validate is not None:
            validate()
    except Exception as error:  # scikit-learn's InvalidParameterError names the parameter
        raise SpecError(path, [("estimator.params", one_line(error, 500))]) from None
    return estimator
