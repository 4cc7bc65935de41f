"""Which scikit-learn classes a spec may train: the classifiers and regressors of
``sklearn.utils.all_estimators``, nothing else.

Two checks, one list. At DAG parse time scikit-learn is not imported, so :func:`catalog` reads
the allowed class paths, their kind and their ``__init__`` parameter names from
``sklearn_estimators.json`` (generated from the installed scikit-learn by
``python -m airmlops.estimators``; a unit test fails when it no longer matches). When a model is
built (``airmlops spec check``, the train task), :func:`resolve` asks scikit-learn itself and
accepts a class only if it *is* one of the estimators ``all_estimators`` returns for the task,
before anything is constructed. Nothing outside scikit-learn's public modules is imported.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Literal

EstimatorKind = Literal["classifier", "regressor"]
KINDS: tuple[EstimatorKind, ...] = ("classifier", "regressor")
CATALOG_PATH = Path(__file__).with_name("sklearn_estimators.json")


@functools.cache
def catalog() -> dict[str, dict[str, Any]]:
    """``{class_path: {"kinds": [...], "params": [...]}}`` of every allowed estimator."""
    return json.loads(CATALOG_PATH.read_text(encoding="utf-8"))["estimators"]


@functools.cache
def allowed_classes(kind: EstimatorKind) -> tuple[type, ...]:
    """The estimator classes ``sklearn.utils.all_estimators`` lists for ``kind`` (imports
    scikit-learn's public modules, a few seconds the first time)."""
    if kind not in KINDS:
        raise ValueError(f"unknown estimator kind {kind!r}; expected one of {list(KINDS)}")
    from sklearn.utils import all_estimators

    return tuple(cls for _, cls in all_estimators(type_filter=kind))


def resolve(class_path: str, kind: EstimatorKind) -> type | None:
    """The class ``class_path`` names if it is one of the allowed ``kind`` estimators, else None.

    The module is looked up among those scikit-learn has already imported (listing its
    estimators imports every public module), never imported here, and the attribute is read
    from the module's namespace without running any ``__getattr__`` hook; the class must be
    one of the allowed classes by identity.
    """
    allowed = allowed_classes(kind)
    module_name, _, class_name = class_path.rpartition(".")
    if module_name != "sklearn" and not module_name.startswith("sklearn."):
        return None
    module = sys.modules.get(module_name)
    candidate = vars(module).get(class_name) if module is not None else None
    return candidate if any(candidate is cls for cls in allowed) else None


def init_params(cls: type) -> list[str]:
    """The keyword parameters of an estimator's ``__init__`` (scikit-learn's ``get_params``)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def build_catalog() -> dict[str, dict[str, Any]]:
    """The catalog as the installed scikit-learn defines it (every public path of each class)."""
    import sklearn

    entries: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        allowed = allowed_classes(kind)
        for module_name, module in sorted(sys.modules.items()):
            if not module_name.startswith("sklearn.") or "._" in module_name or (
                    ".tests" in module_name or module is None):
                continue
            for name, value in vars(module).items():
                if not name.startswith("_") and any(value is cls for cls in allowed):
                    entry = entries.setdefault(f"{module_name}.{name}",
                                               {"kinds": [], "params": init_params(value)})
                    entry["kinds"].append(kind)
    return {"sklearn_version": sklearn.__version__,
            "estimators": dict(sorted(entries.items()))}


if __name__ == "__main__":
    CATALOG_PATH.write_text(json.dumps(build_catalog(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {CATALOG_PATH}")
