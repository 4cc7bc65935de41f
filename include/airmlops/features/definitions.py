"""Feature definitions: entities, feature views and on-demand features (embedded in a spec).

In a pipeline spec these read like this::

    entities:
      - {name: customer, join_key: customer_id}
    request_fields: [event_timestamp]
    views:
      - name: activity                 # windowed aggregations of event rows
        entity: customer
        source: events
        ttl_days: 2
        aggregations:
          - {column: sessions, function: sum, window_days: 7}
          - {column: minutes_watched, function: mean, window_days: 30}
      - name: profile                  # the latest value of slowly changing columns
        entity: customer
        source: profiles
        ttl_days: 400
        columns: [plan, monthly_fee]
    on_demand:
      - name: minutes_per_session
        function: minutes_per_session  # a function registered in on_demand_library
        inputs: [activity__minutes_watched_sum_7d, activity__sessions_sum_7d]
        type: numeric

Feature names are stable and are the column names everywhere (offline store, training sets,
online store, the model's inputs):

- aggregation: ``<view>__<column>_<function>_<window>d``, e.g. ``activity__sessions_sum_7d``;
- profile column: ``<view>__<column>``, e.g. ``profile__plan``;
- on-demand feature: its ``name``.

Semantics (see :mod:`~airmlops.features.compute` for the details):

- ``events`` views aggregate event rows per entity over calendar-day windows. The row for day
  D is stamped at the last microsecond of D (UTC) and covers the days D-window+1 .. D; a value is
  usable by a request at time t when D's stamp <= t and the stamp is newer than t - ttl.
- ``profiles`` views keep the columns' values as of each raw row's own timestamp.
- ``count`` counts non-null values; ``sum`` of no values is 0; ``mean``, ``min``, ``max`` and
  ``last`` of no values are missing. ``last`` is the newest non-null value in the window.

A :class:`FeatureView` holds its :class:`Entity` (in YAML the entity is named and the
:class:`FeatureSet` resolves it), so every store function needs only the view.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airmlops.names import COLUMN_PATTERN, NAME_PATTERN

FEATURE_TIMESTAMP = "event_timestamp"
"""Name of the as-of time column of every feature-view row (offline and online)."""


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Column = Annotated[str, Field(pattern=COLUMN_PATTERN)]

AggregationFunction = Literal["count", "sum", "mean", "min", "max", "last"]


def _no_double_underscore(value: str) -> str:
    if "__" in value or value.endswith("_"):
        raise ValueError("must not contain '__' or end with '_' ('__' separates view and feature)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Entity(_Strict):
    """What features describe (a customer), and the column that identifies one."""

    name: Name
    join_key: Column

    @field_validator("join_key")
    @classmethod
    def _not_the_timestamp(cls, value: str) -> str:
        if value == FEATURE_TIMESTAMP:
            raise ValueError(f"'{FEATURE_TIMESTAMP}' is reserved for the feature timestamp")
        return value


class Aggregation(_Strict):
    """One windowed aggregation of an event column."""

    column: Column
    function: AggregationFunction
    window_days: int = Field(ge=1, le=3650)

    @property
    def suffix(self) -> str:
        return f"{self.column}_{self.function}_{self.window_days}d"


class FeatureView(_Strict):
    """A group of features of one entity, computed together, stored and served together.

    ``source: events`` views have ``aggregations``; ``source: profiles`` views have
    ``columns``. ``ttl_days``: a feature row older than this is not served (nor joined into
    a training row), and online keys expire after it.
    """

    name: Name
    entity: Entity
    source: Literal["events", "profiles"]
    aggregations: list[Aggregation] = Field(default_factory=list)
    columns: list[Column] = Field(default_factory=list)
    ttl_days: int = Field(ge=1, le=36500)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name_has_no_separator(cls, value: str) -> str:
        return _no_double_underscore(value)

    @model_validator(mode="after")
    def _fields_fit_source(self) -> FeatureView:
        if self.source == "events":
            if not self.aggregations:
                raise ValueError("an events view needs at least one aggregation")
            if self.columns:
                raise ValueError("an events view has aggregations, not columns")
        else:
            if not self.columns:
                raise ValueError("a profiles view needs at least one column")
            if self.aggregations:
                raise ValueError("a profiles view has columns, not aggregations")
        for column in self.source_columns:
            if column in (self.entity.join_key, FEATURE_TIMESTAMP):
                raise ValueError(f"column '{column}' is the join key or the feature timestamp")
        duplicated = sorted({n for n in self.feature_names if self.feature_names.count(n) > 1})
        if duplicated:
            raise ValueError(f"duplicated features {duplicated}")
        return self

    @property
    def join_key(self) -> str:
        return self.entity.join_key

    @property
    def feature_names(self) -> list[str]:
        """Full feature names, in definition order."""
        if self.source == "events":
            return [f"{self.name}__{a.suffix}" for a in self.aggregations]
        return [f"{self.name}__{c}" for c in self.columns]

    @property
    def source_columns(self) -> list[str]:
        """The raw columns this view reads (besides the join key and the timestamp)."""
        if self.source == "events":
            return list(dict.fromkeys(a.column for a in self.aggregations))
        return list(self.columns)

    @property
    def ttl_seconds(self) -> int:
        return self.ttl_days * 86_400

    @property
    def max_window_days(self) -> int:
        return max((a.window_days for a in self.aggregations), default=0)


class OnDemandFeature(_Strict):
    """A feature computed at request time from request fields and looked-up features."""

    name: Name
    function: Name = Field(description="A function registered in on_demand_library.")
    inputs: list[str] = Field(min_length=1)
    type: Literal["numeric", "categorical"] = "numeric"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name_has_no_separator(cls, value: str) -> str:
        return _no_double_underscore(value)

    @model_validator(mode="after")
    def _function_is_registered(self) -> OnDemandFeature:
        from airmlops.features.on_demand_library import REGISTRY

        function = REGISTRY.get(self.function)
        if function is None:
            raise ValueError(
                f"function '{self.function}' is not a registered on-demand function; "
                f"expected one of {sorted(REGISTRY)}"
            )
        if function.arity != len(self.inputs):
            raise ValueError(
                f"function '{self.function}' takes {function.arity} input(s), "
                f"got {len(self.inputs)}"
            )
        if function.output_type != self.type:
            raise ValueError(f"function '{self.function}' returns {function.output_type} values")
        return self


class FeatureSet(_Strict):
    """All features of a pipeline: entities, views, request fields and on-demand features."""

    entities: list[Entity] = Field(min_length=1)
    views: list[FeatureView] = Field(default_factory=list)
    request_fields: list[Column] = Field(
        default_factory=list,
        description="Fields every request (and every training row) carries, usable as "
        "on-demand inputs, e.g. the event timestamp.",
    )
    on_demand: list[OnDemandFeature] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _resolve_entities(cls, data: Any) -> Any:
        """Let views name their entity; replace the name by the declared entity."""
        if not isinstance(data, dict) or not isinstance(data.get("views"), list):
            return data
        declared: dict[str, Any] = {}
        for entity in data.get("entities") or []:
            if isinstance(entity, Entity):
                declared[entity.name] = entity
            elif isinstance(entity, dict) and isinstance(entity.get("name"), str):
                declared[entity["name"]] = entity
        views = []
        for view in data["views"]:
            if isinstance(view, dict) and isinstance(view.get("entity"), str):
                if view["entity"] not in declared:
                    raise ValueError(
                        f"view '{view.get('name')}': unknown entity '{view['entity']}'; "
                        f"declared: {sorted(declared)}"
                    )
                view = {**view, "entity": declared[view["entity"]]}
            views.append(view)
        return {**data, "views": views}

    @model_validator(mode="after")
    def _names_are_consistent(self) -> FeatureSet:
        def duplicates(names: list[str]) -> list[str]:
            return sorted({n for n in names if names.count(n) > 1})

        for what, names in (
            ("entities", [e.name for e in self.entities]),
            ("views", [v.name for v in self.views]),
            ("request_fields", list(self.request_fields)),
        ):
            if duplicates(names):
                raise ValueError(f"{what}: duplicated names {duplicates(names)}")
        entities = {e.name: e for e in self.entities}
        for view in self.views:
            if entities.get(view.entity.name) != view.entity:
                raise ValueError(f"view '{view.name}': entity '{view.entity.name}' is not declared")
        view_features = [n for v in self.views for n in v.feature_names]
        on_demand_names = [f.name for f in self.on_demand]
        all_names = view_features + on_demand_names + list(self.request_fields)
        if duplicates(all_names):
            raise ValueError(
                f"feature names must be unique across views, on-demand features and request "
                f"fields: {duplicates(all_names)}"
            )
        available = set(self.request_fields) | set(view_features)
        for feature in self.on_demand:
            unknown = [i for i in feature.inputs if i not in available]
            if unknown:
                raise ValueError(
                    f"on-demand feature '{feature.name}': input(s) {unknown} are neither request "
                    "fields, view features nor earlier on-demand features"
                )
            available.add(feature.name)
        return self

    def view(self, name: str) -> FeatureView:
        """The view called ``name``; KeyError names the declared ones."""
        for view in self.views:
            if view.name == name:
                return view
        raise KeyError(f"no feature view '{name}'; declared: {[v.name for v in self.views]}")

    def select_views(self, names: list[str] | None = None) -> list[FeatureView]:
        """The named views (all when ``names`` is None), in declaration order."""
        if names is None:
            return list(self.views)
        return [self.view(name) for name in names]

    @property
    def feature_names(self) -> list[str]:
        """Every feature a model can consume: view features, then on-demand features."""
        return [n for v in self.views for n in v.feature_names] + [f.name for f in self.on_demand]

    def definitions_hash(self) -> str:
        """A digest of the definitions and of the on-demand code they run (for lineage).

        It changes when a view, a window, a TTL or an on-demand function's source changes, and
        does not depend on YAML formatting or key order.
        """
        from airmlops.features.on_demand_library import get_function

        code = {}
        for feature in self.on_demand:
            function = get_function(feature.function)
            try:
                code[feature.function] = [
                    inspect.getsource(function.scalar),
                    inspect.getsource(function.vectorized),
                ]
            except (OSError, TypeError):  # no source available: fall back to the bytecode
                code[feature.function] = [
                    function.scalar.__code__.co_code.hex(),
                    function.vectorized.__code__.co_code.hex(),
                ]
        canonical = json.dumps(
            {"definitions": self.model_dump(mode="json"), "on_demand_code": code}, sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

