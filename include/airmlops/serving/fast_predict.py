"""Scoring request rows without pandas: a fitted Pipeline's parameters applied with NumPy.

scikit-learn validates its input on every call (column names, dtypes, finiteness, per step):
on a one-row DataFrame the demo Pipeline's ``predict_proba`` costs ~7 ms on the build machine,
almost all of it in ColumnTransformer and SimpleImputer checks, and building the frame costs
~3 ms more; the arithmetic itself is a few microseconds. A request needs none of that: the
fitted parameters are plain arrays. :func:`compile_scorer` reads them once from the building
blocks :func:`airmlops.training.model.build_pipeline` uses (ColumnTransformer, SimpleImputer,
StandardScaler, OneHotEncoder) and returns a :class:`FastScorer` that goes from row dicts to
scores with a handful of NumPy operations, in the same order as scikit-learn's own transforms,
so the floats are the same. The final estimator is applied in closed form when it is a linear
model (logistic regression, linear/ridge/lasso/elastic-net regression) and otherwise called on
the NumPy matrix (still much cheaper than on a DataFrame).

Anything it does not know (another transformer, a ``remainder`` that is not dropped, sparse
output, infrequent categories, ...) gives ``None``: the caller keeps the Pipeline. A compiled
scorer is only trusted after :meth:`FastScorer.agrees_with` has compared it with the Pipeline
on synthetic rows (:meth:`FastScorer.probe_rows`); the model service does that when it loads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from airmlops.data.categories import category

log = logging.getLogger(__name__)

LINEAR_REGRESSORS = frozenset({"LinearRegression", "Ridge", "Lasso", "ElasticNet"})
"""Regressors whose ``predict`` is ``X @ coef_ + intercept_`` (LinearModel._decision_function)."""

UNSEEN_CATEGORY = "__airmlops_unseen__"


class NotCompilable(ValueError):
    """The fitted model has a part the fast path does not reproduce."""


# --- steps -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Impute:
    """SimpleImputer: missing values (NaN, or None/NaN for categories) become ``fill``."""

    fill: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _Scale:
    """StandardScaler: ``X -= mean``, then ``X /= scale`` (in that order, like scikit-learn)."""

    mean: np.ndarray | None
    scale: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class _OneHot:
    """OneHotEncoder (dense, unknown categories ignored): one 0/1 column per known category."""

    lookup: tuple[dict[Any, int], ...]
    offsets: tuple[int, ...]
    width: int


@dataclasses.dataclass(frozen=True)
class _Block:
    """One ColumnTransformer entry: its input columns, their kind and its steps in order;
    ``boolean`` says, per column, whether it is a boolean feature (1/0 are true/false)."""

    columns: tuple[str, ...]
    numeric: bool
    steps: tuple[_Impute | _Scale | _OneHot, ...]
    boolean: tuple[bool, ...] = ()


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _step(transformer: Any, numeric: bool) -> _Impute | _Scale | _OneHot:
    name = type(transformer).__name__
    if name == "SimpleImputer":
        if getattr(transformer, "add_indicator", False):
            raise NotCompilable("SimpleImputer with add_indicator")
        missing = transformer.missing_values
        if not (isinstance(missing, float) and math.isnan(missing)):
            raise NotCompilable(f"SimpleImputer with missing_values={missing!r}")
        fill = tuple(transformer.statistics_.tolist())
        if any(value is None or _is_nan(value) for value in fill):
            raise NotCompilable("SimpleImputer with a feature that had no observed value")
        if numeric:
            fill = tuple(float(value) for value in fill)
        return _Impute(fill)
    if name == "StandardScaler":
        if not numeric:
            raise NotCompilable("StandardScaler on categorical columns")
        mean = np.asarray(transformer.mean_, dtype="float64") if transformer.with_mean else None
        scale = (np.asarray(transformer.scale_, dtype="float64")
                 if transformer.with_std and transformer.scale_ is not None else None)
        return _Scale(mean, scale)
    if name == "OneHotEncoder":
        if transformer.drop is not None or getattr(transformer, "drop_idx_", None) is not None:
            raise NotCompilable("OneHotEncoder with drop")
        if getattr(transformer, "_infrequent_enabled", False):
            raise NotCompilable("OneHotEncoder with infrequent categories")
        if transformer.handle_unknown not in ("ignore", "infrequent_if_exist"):
            raise NotCompilable(f"OneHotEncoder with handle_unknown={transformer.handle_unknown}")
        if transformer.sparse_output or np.dtype(transformer.dtype) != np.float64:
            raise NotCompilable("OneHotEncoder with sparse or non-float64 output")
        lookup, offsets, width = [], [], 0
        for categories in transformer.categories_:
            values = categories.tolist()
            if any(value is None or _is_nan(value) for value in values):
                raise NotCompilable("OneHotEncoder that learned a missing-value category")
            lookup.append({value: index for index, value in enumerate(values)})
            offsets.append(width)
            width += len(values)
        return _OneHot(tuple(lookup), tuple(offsets), width)
    raise NotCompilable(f"transformer {name}")


def _block(name: str, transformer: Any, columns: Any, numeric_names: set[str],
           categorical_names: set[str], boolean_names: frozenset[str] = frozenset()
           ) -> _Block | None:
    if isinstance(transformer, str):
        if transformer == "drop":
            return None
        raise NotCompilable(f"ColumnTransformer entry {name!r} is {transformer!r}")
    if not isinstance(columns, list | tuple) or not all(isinstance(c, str) for c in columns):
        raise NotCompilable(f"ColumnTransformer entry {name!r} selects columns by position")
    if not columns:
        return None
    if set(columns) <= numeric_names:
        numeric = True
    elif set(columns) <= categorical_names:
        numeric = False
    else:
        raise NotCompilable(f"ColumnTransformer entry {name!r} mixes or names unknown columns")
    parts = [step for _, step in transformer.steps] if type(transformer).__name__ == "Pipeline" \
        else [transformer]
    steps = []
    kind_numeric = numeric
    for part in parts:
        if isinstance(part, str):  # "passthrough" inside a Pipeline
            if part != "passthrough":
                raise NotCompilable(f"pipeline step {part!r}")
            continue
        step = _step(part, kind_numeric)
        steps.append(step)
        if isinstance(step, _OneHot):
            kind_numeric = True  # what follows sees the 0/1 matrix
    if not kind_numeric:
        raise NotCompilable(f"ColumnTransformer entry {name!r} leaves categories unencoded")
    flags = () if numeric else tuple(column in boolean_names for column in columns)
    return _Block(tuple(columns), numeric, tuple(steps), flags)


# --- the scorer --------------------------------------------------------------------------------


class FastScorer:
    """Scores of row dicts from a compiled Pipeline (see the module docstring).

    ``scores(rows)`` returns what the service scores with: the probability of class
    ``positive`` for a classifier, the prediction for a regressor, as float64.
    """

    def __init__(self, blocks: Sequence[_Block], estimator: Any, *, kind: str,
                 positive: Any = None) -> None:
        self.blocks = tuple(blocks)
        self.estimator = estimator
        self.kind = kind
        self.columns = tuple(dict.fromkeys(c for b in self.blocks for c in b.columns))
        self._positive_index = None
        if positive is not None:
            classes = list(getattr(estimator, "classes_", []))
            self._positive_index = classes.index(positive)
        if kind == "logistic":
            self._coef_t = np.asarray(estimator.coef_).T
            self._intercept = np.asarray(estimator.intercept_)
        elif kind == "linear":
            self._coef = np.asarray(estimator.coef_)
            self._intercept = estimator.intercept_

    @property
    def description(self) -> str:
        steps = " + ".join(
            f"{'numeric' if b.numeric else 'categorical'}[{len(b.columns)}]:"
            + ",".join(type(s).__name__.strip("_").lower() for s in b.steps)
            for b in self.blocks)
        return f"{steps} -> {type(self.estimator).__name__} ({self.kind})"

    def matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The estimator's input matrix: what the Pipeline's ColumnTransformer would output."""
        outputs = []
        for block in self.blocks:
            if block.numeric:
                values: Any = np.array(
                    [[_number(row.get(c)) for c in block.columns] for row in rows],
                    dtype="float64").reshape(len(rows), len(block.columns))
                if block.steps and np.isinf(values).any():  # every step validates this
                    raise ValueError("Input X contains infinity or a value too large for "
                                     "dtype('float64').")
            else:
                cells = tuple(zip(block.columns, block.boolean or (False,) * len(block.columns),
                                  strict=True))
                values = [[_category(row.get(c), b) for c, b in cells] for row in rows]
            for step in block.steps:
                values = _apply(step, values)
            outputs.append(values)
        return np.hstack(outputs) if len(outputs) > 1 else outputs[0]

    def scores(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Positive-class probability (classifier) or prediction (regressor) per row."""
        X = self.matrix(rows)
        if self.kind != "estimator" and not np.isfinite(X).all():
            raise ValueError("Input X contains NaN or infinity.")  # the estimator's own check
        if self.kind == "logistic":
            from scipy.special import expit

            decision = X @ self._coef_t + self._intercept
            probability = expit(decision.reshape(-1))
            return probability if self._positive_index == 1 else 1 - probability
        if self.kind == "linear":
            return np.asarray(X @ self._coef + self._intercept, dtype="float64").reshape(-1)
        if self._positive_index is not None:
            probabilities = np.asarray(self.estimator.predict_proba(X), dtype="float64")
            return probabilities[:, self._positive_index]
        return np.asarray(self.estimator.predict(X), dtype="float64").reshape(-1)

    def probe_rows(self, count: int = 256, seed: int = 0) -> list[dict[str, Any]]:
        """Synthetic rows that exercise every part: numbers across magnitudes and signs, every
        known category, an unseen one, and missing values everywhere."""
        rng = np.random.default_rng(seed)
        known: dict[str, list[Any]] = {}
        for block in self.blocks:
            for step in block.steps:
                if isinstance(step, _OneHot):
                    for column, lookup in zip(block.columns, step.lookup, strict=True):
                        known[column] = list(lookup)
        rows = []
        for _ in range(count):
            row: dict[str, Any] = {}
            for block in self.blocks:
                for column in block.columns:
                    if rng.random() < 0.1:
                        row[column] = None
                    elif block.numeric:
                        magnitude = 10.0 ** rng.uniform(-3, 4)
                        row[column] = float(rng.choice([-1.0, 1.0]) * magnitude)
                    else:
                        choices = [*known.get(column, []), UNSEEN_CATEGORY]
                        row[column] = choices[int(rng.integers(len(choices)))]
            rows.append(row)
        return rows

    def agrees_with(self, reference: Callable[[list[dict[str, Any]]], np.ndarray],
                    rows: list[dict[str, Any]] | None = None, *,
                    tolerance: float = 1e-9) -> tuple[bool, float]:
        """(whether every score is within ``tolerance`` of ``reference``'s, the largest gap),
        on ``rows`` (default: :meth:`probe_rows`), scored together and one by one."""
        rows = rows if rows is not None else self.probe_rows()
        expected = np.asarray(reference(rows), dtype="float64")
        batch = self.scores(rows)
        single = np.concatenate([self.scores([row]) for row in rows[:32]])
        gap = max(float(np.max(np.abs(batch - expected), initial=0.0)),
                  float(np.max(np.abs(single - expected[:len(single)]), initial=0.0)))
        same_nan = bool((np.isnan(batch) == np.isnan(expected)).all())
        return same_nan and gap <= tolerance, gap


def _number(value: Any) -> float:
    """A numeric cell as ``feature_frame`` makes it (``pd.to_numeric(...).astype(float64)``)."""
    if value is None:
        return math.nan
    return float(value)


def _category(value: Any, boolean: bool = False) -> str | None:
    """A categorical cell as ``feature_frame`` makes it: its canonical text
    (:func:`airmlops.data.categories.category`), missing stays missing (None)."""
    return category(value, boolean=boolean)


def _apply(step: _Impute | _Scale | _OneHot, values: Any) -> Any:
    if isinstance(step, _Impute):
        if isinstance(values, np.ndarray):
            missing = np.isnan(values)
            if missing.any():
                values = np.where(missing, np.asarray(step.fill, dtype="float64"), values)
            return values
        return [[step.fill[j] if cell is None else cell for j, cell in enumerate(row)]
                for row in values]
    if isinstance(step, _Scale):
        values = np.array(values, dtype="float64")  # a copy, like check_array(copy=True)
        if step.mean is not None:
            values -= step.mean
        if step.scale is not None:
            values /= step.scale
        return values
    encoded = np.zeros((len(values), step.width), dtype="float64")
    for i, row in enumerate(values):
        for j, cell in enumerate(row):
            # A missing value not learned as a category is unknown: ignored, like any other.
            index = None if cell is None else step.lookup[j].get(cell)
            if index is not None:
                encoded[i, step.offsets[j] + index] = 1.0
    return encoded


def compile_scorer(model: Any, numeric: Sequence[str], categorical: Sequence[str], *,
                   positive: Any = None, boolean: Sequence[str] = ()) -> FastScorer:
    """A :class:`FastScorer` for a fitted ``Pipeline([ColumnTransformer, estimator])`` whose
    input columns are ``numeric`` (float64) and ``categorical`` (strings); ``positive`` is the
    class whose probability a classifier's score is (None for a regressor). ``boolean`` names
    the categorical columns that are boolean features (``spec.boolean_features``): there, like
    in ``feature_frame``, 1/0 mean true/false.

    Raises :class:`NotCompilable` naming the first part it cannot reproduce.
    """
    steps = getattr(model, "steps", None)
    if type(model).__name__ != "Pipeline" or not steps or len(steps) != 2:
        raise NotCompilable("the model is not a two-step Pipeline (ColumnTransformer, estimator)")
    (_, columns), (_, estimator) = steps
    if type(columns).__name__ != "ColumnTransformer":
        raise NotCompilable(f"the first step is {type(columns).__name__}")
    if getattr(columns, "sparse_output_", False):
        raise NotCompilable("the ColumnTransformer has sparse output")
    output = getattr(columns, "_sklearn_output_config", {}).get("transform")
    if output not in (None, "default"):
        raise NotCompilable(f"the ColumnTransformer outputs {output}")
    numeric_names, categorical_names = set(numeric), set(categorical)
    blocks = []
    for name, transformer, selected in columns.transformers_:
        if name == "remainder":
            if (isinstance(transformer, str) and transformer == "drop") or not len(selected):
                continue
            raise NotCompilable("the ColumnTransformer's remainder is not dropped")
        block = _block(name, transformer, selected, numeric_names, categorical_names,
                       frozenset(boolean))
        if block is not None:
            blocks.append(block)
    if not blocks:
        raise NotCompilable("the ColumnTransformer selects no column")
    name = type(estimator).__name__
    classes = getattr(estimator, "classes_", None)
    if positive is not None:
        if classes is None or positive not in list(classes):
            raise NotCompilable(f"the estimator has no class {positive!r}")
        binary_logistic = (name == "LogisticRegression" and len(classes) == 2
                           and np.asarray(estimator.coef_).shape[0] == 1)
        kind = "logistic" if binary_logistic else "estimator"
        if kind == "estimator" and not hasattr(estimator, "predict_proba"):
            raise NotCompilable(f"{name} has no predict_proba")
    else:
        linear = name in LINEAR_REGRESSORS and np.asarray(estimator.coef_).ndim == 1
        kind = "linear" if linear else "estimator"
    if kind == "estimator" and hasattr(estimator, "feature_names_in_"):
        raise NotCompilable(f"{name} was fitted on named columns")
    return FastScorer(blocks, estimator, kind=kind, positive=positive)
