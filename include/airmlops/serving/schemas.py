"""The service's request and response bodies: the per-pipeline request models built from the
spec (:func:`request_models`), the response models of the OpenAPI schema, error bodies
(:func:`error_body`) and one-line descriptions of validation errors (:func:`describe_errors`)."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
)

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

ENTITY_MAX_LENGTH = 256


def _entity_id(value: Any) -> Any:
    """An entity id: a string of 1 to ``ENTITY_MAX_LENGTH`` characters or an integer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a string or an integer")
    if isinstance(value, str) and not 0 < len(value) <= ENTITY_MAX_LENGTH:
        raise ValueError(f"must be 1 to {ENTITY_MAX_LENGTH} characters")
    return value


EntityId = Annotated[str | int, BeforeValidator(_entity_id)]


def _finite_label(value: Any) -> Any:
    """A regression label: a finite number within the float range (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a finite number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError("must be a finite number within the float range") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number within the float range")
    return number


def _binary_label(value: Any) -> Any:
    """A binary classification label: 0, 1, true or false."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    raise ValueError("must be 0, 1, true or false (binary classification)")


class LabelItem(BaseModel):
    """One observed outcome (a regression label; see :func:`request_models`)."""

    model_config = ConfigDict(extra="forbid")

    entity: EntityId
    label: Annotated[float, BeforeValidator(_finite_label)]


class BinaryLabelItem(LabelItem):
    """One observed outcome of a binary classifier."""

    label: Annotated[float, BeforeValidator(_binary_label)]


def _boolean_field(value: Any) -> str:
    """A boolean request field in the model's text: JSON true/false, "true"/"false" in any
    case, or 1/0 become "true"/"false"; anything else is refused."""
    from airmlops.data.categories import BOOLEAN_VALUES, category

    accepted = (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
                or (isinstance(value, str) and value.lower() in BOOLEAN_VALUES))
    text = category(value, boolean=True) if accepted else None
    if text is None:
        raise ValueError('must be a boolean: true or false, "true" or "false" (any case), '
                         "or 1 or 0")
    return text


def _declared_category(allowed: frozenset[str], value: Any) -> Any:
    """A categorical request field with declared ``values``: a JSON boolean or integer (or a
    string in another case of "true"/"false") whose canonical text is one of them becomes that
    text, as in training; anything else is left for the ``Literal`` check to refuse."""
    from airmlops.data.categories import category

    if isinstance(value, bool | int | str):
        text = category(value)
        if text in allowed:
            return text
    return value


def request_models(spec: PipelineSpec, max_instances: int) -> tuple[type[BaseModel],
                                                                     type[BaseModel]]:
    """The (predict, feedback) request models of a pipeline, from its spec.

    A prediction row has the entity key and the spec's request fields, typed and bounded as
    the spec declares them (numbers finite and within min/max, categories among ``values``);
    a field may be null only if the spec allows missing values for it. Unknown fields are
    refused. Field names are the spec's column names (as aliases, so any column name works).
    Categories arrive in the canonical text training used (:mod:`airmlops.data.categories`):
    a boolean field takes true/false, "true"/"false" or 1/0 and becomes "true"/"false"; a
    field with ``values`` also takes a JSON boolean or integer whose text is among them.
    """
    by_name = {f.name: f for f in spec.features}
    fields: dict[str, Any] = {"f_entity": (EntityId, Field(alias=spec.entity_key))}
    for index, name in enumerate(spec.request_fields):
        column = by_name.get(name)
        if column is None:  # the event timestamp as a request field
            annotation: Any = Annotated[str, Strict(), Field(max_length=64)]
        elif column.type == "numeric":
            annotation = Annotated[float, Strict(), Field(ge=column.min, le=column.max,
                                                          allow_inf_nan=False)]
        elif column.type == "boolean":
            annotation = Annotated[str, BeforeValidator(_boolean_field)]
        elif column.values:
            allowed = functools.partial(_declared_category, frozenset(column.values))
            annotation = Annotated[Literal[tuple(column.values)], BeforeValidator(allowed)]
        else:
            annotation = Annotated[str, Strict(), Field(max_length=ENTITY_MAX_LENGTH)]
        if column is not None and column.max_null_fraction > 0:
            annotation = annotation | None
        fields[f"f_{index}"] = (annotation, Field(alias=name))
    instance = create_model(
        f"{spec.name.title().replace('_', '')}Instance",
        __config__=ConfigDict(extra="forbid", populate_by_name=False),
        **fields,
    )
    predict = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        instances=(list[instance], Field(min_length=1, max_length=max_instances)),
    )
    label_item = BinaryLabelItem if spec.task == "binary_classification" else LabelItem
    feedback = create_model(
        "FeedbackRequest",
        __config__=ConfigDict(extra="forbid"),
        request_id=(str, Field(pattern=r"^[0-9a-f]{32}$")),
        labels=(list[label_item], Field(min_length=1, max_length=max_instances)),
        overwrite=(Annotated[bool, Strict()], False),
    )
    return predict, feedback


class PredictionItem(BaseModel):
    """One row of a ``/predict`` answer (no ``probability`` for regression)."""

    entity: str | int
    prediction: float
    probability: float | None = None


class PredictResponse(BaseModel):
    """The answer of ``/predict`` (documented in the OpenAPI schema)."""

    model_config = ConfigDict(protected_namespaces=())

    predictions: list[PredictionItem]
    model_name: str
    model_version: str
    request_id: str


class FeedbackResponse(BaseModel):
    """The answer of ``/feedback``: how many labels were stored."""

    request_id: str
    accepted: int


def describe_errors(error: ValidationError, limit: int = 10) -> str:
    """One line per problem, naming the field: ``instances[0].age: is required``."""
    parts = []
    for item in error.errors(include_url=False)[:limit]:
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        kind, message = item["type"], item["msg"].removeprefix("Value error, ")
        if kind == "missing":
            message = "is required"
        elif kind == "model_type" and not item["loc"]:
            message = "must be a JSON object"
        elif kind == "extra_forbidden":
            message = "is not a known field"
        elif kind in ("too_short", "too_long") and path in ("instances", "labels"):
            message = message.replace("List", "the list")
        elif "input" in item and kind not in ("model_type", "model_attributes_type", "list_type"):
            shown = repr(item["input"])
            message = f"{message} (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        parts.append(f"{path or 'body'}: {message}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)



def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of a refused or failed request: its kind, a message naming the problem."""
    return {"error": kind, "message": message, **extra}
