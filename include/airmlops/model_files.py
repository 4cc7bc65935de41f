"""The one loader of model artifacts: skops only, exact trusted types, digests checked first.

A model artifact is data that may have been swapped in the registry's artifact store, so every
place that loads a model (the model service, the champion gate, the bake stage) goes through
:func:`load_model_dir`:

1. the sha256 of ``MLmodel`` and of the model file must equal those recorded when the model was
   logged (:class:`ModelDigests`), checked on the bytes before anything parses them;
2. ``MLmodel`` must describe a scikit-learn model in the skops format (pickle and cloudpickle
   run code when loaded, so they are refused);
3. the types the skops file asks to construct (``skops.io.get_untrusted_types``) must all be in
   the list recorded at training (``skops_trusted_types`` in ``MLmodel``) and in
   :func:`safe_type_names`, the platform's allow-list of classes that are safe to construct;
4. only then does skops build the object, from the same bytes that were checked, trusting
   exactly those types.

Nothing heavy is imported at module level: scikit-learn and skops are imported when a model is
checked or loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

MODEL_SHA256_TAG = "model_sha256"
"""Run / model version tag: sha256 of the skops model file, recorded when the model is logged."""
MLMODEL_SHA256_TAG = "mlmodel_sha256"
"""Run / model version tag: sha256 of the ``MLmodel`` file, recorded when the model is logged."""
DIGEST_TAGS = (MODEL_SHA256_TAG, MLMODEL_SHA256_TAG)

MLMODEL_FILE = "MLmodel"
SKOPS_FORMAT = "skops"

SKLEARN_INTERNAL_TYPES = frozenset({
    # Fitted trees: DecisionTree*, ExtraTree*, RandomForest*, ExtraTrees*, GradientBoosting*,
    # AdaBoost*, Bagging*, IsolationForest.
    "sklearn.tree._tree.Tree",
    # HistGradientBoosting*.
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    # Losses and links of the GLMs and gradient boosting (their ``loss``/``power``/``link``).
    "sklearn._loss.loss.AbsoluteError",
    "sklearn._loss.loss.ExponentialLoss",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfGammaLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss.loss.HalfPoissonLoss",
    "sklearn._loss.loss.HalfSquaredError",
    "sklearn._loss.loss.HalfTweedieLoss",
    "sklearn._loss.loss.HalfTweedieLossIdentity",
    "sklearn._loss.loss.HuberLoss",
    "sklearn._loss.loss.PinballLoss",
    "sklearn._loss.link.HalfLogitLink",
    "sklearn._loss.link.IdentityLink",
    "sklearn._loss.link.Interval",
    "sklearn._loss.link.LogLink",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.MultinomialLogit",
    # Neighbours (KNeighbors*, RadiusNeighbors*): the search trees and the built-in metrics
    # (not PyFuncDistance64, which wraps an arbitrary function).
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neighbors._kd_tree.KDTree",
    *(f"sklearn.metrics._dist_metrics.{name}Distance64" for name in (
        "BrayCurtis", "Canberra", "Chebyshev", "Dice", "Euclidean", "Hamming", "Haversine",
        "Jaccard", "Mahalanobis", "Manhattan", "Matching", "Minkowski", "RogersTanimoto",
        "RussellRao", "SEuclidean", "SokalMichener", "SokalSneath")),
    # MLP*: the optimizer state.
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    # GaussianProcess*: the fitted kernel and the binary Laplace classifier.
    *(f"sklearn.gaussian_process.kernels.{name}" for name in (
        "ConstantKernel", "DotProduct", "ExpSineSquared", "Exponentiation", "Matern",
        "Product", "RBF", "RationalQuadratic", "Sum", "WhiteKernel")),
    "sklearn.gaussian_process._gpc._BinaryGaussianProcessClassifierLaplace",
    # CalibratedClassifierCV.
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})
"""Non-estimator scikit-learn classes the supported estimators store when fitted, found by
fitting every classifier and regressor of ``all_estimators`` (and their ``loss``, ``metric``,
``algorithm`` and ``solver`` variants) in the platform's Pipeline and asking skops which types
it reports (tests/unit/test_model_files.py repeats that derivation)."""

NUMPY_TYPES = frozenset({"numpy.dtype"})
"""NumPy classes skops reports for fitted models (array dtypes); its ufuncs it trusts itself."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelLoadError(RuntimeError):
    """A model artifact is refused: wrong format, a type not trusted, a digest that does not
    match the one recorded, or a path outside its folder. The message says which."""


@dataclasses.dataclass(frozen=True)
class ModelDigests:
    """The sha256 digests of a model's two files, recorded when it was logged."""

    model_sha256: str
    mlmodel_sha256: str

    def __post_init__(self) -> None:
        for field in DIGEST_TAGS:
            value = getattr(self, field)
            if not isinstance(value, str) or not _SHA256.fullmatch(value):
                raise ModelLoadError(f"{field}: expected 64 lowercase hex digits (a sha256), "
                                     f"got {value!r}")

    @classmethod
    def from_tags(cls, tags: Mapping[str, Any] | None, where: str) -> ModelDigests:
        """The digests in ``tags`` (a run's, a model version's, a serving config's fields);
        :class:`ModelLoadError` naming the missing field otherwise."""
        tags = tags or {}
        missing = [field for field in DIGEST_TAGS if not tags.get(field)]
        if missing:
            raise ModelLoadError(
                f"{where} has no {' or '.join(missing)}: the model's digests were not recorded "
                "when it was logged, so its files cannot be checked (retrain or re-register it)")
        return cls(str(tags[MODEL_SHA256_TAG]), str(tags[MLMODEL_SHA256_TAG]))

    def to_tags(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CheckedModelFile:
    """A model file whose digests, format and types were checked; ``data`` is what was checked
    (loading uses these bytes, never the file again)."""

    path: Path
    data: bytes
    trusted_types: tuple[str, ...]


@functools.cache
def safe_type_names() -> frozenset[str]:
    """The allow-list: every scikit-learn estimator class of ``all_estimators``, the internals
    in :data:`SKLEARN_INTERNAL_TYPES` and :data:`NUMPY_TYPES`. Only classes, no functions."""
    from sklearn.utils import all_estimators

    estimators = {f"{cls.__module__}.{cls.__qualname__}" for _, cls in all_estimators()}
    return frozenset(estimators | SKLEARN_INTERNAL_TYPES | NUMPY_TYPES)


def check_safe_types(names: Iterable[str], where: str) -> list[str]:
    """``names`` sorted, if all are in :func:`safe_type_names`; :class:`ModelLoadError` naming
    the others otherwise."""
    names = sorted({str(name) for name in names})
    unsafe = [name for name in names if name not in safe_type_names()]
    if unsafe:
        raise ModelLoadError(f"{where} references types outside the platform's allow-list of "
                             f"safe scikit-learn/NumPy classes: {unsafe}")
    return names


def trusted_types_of(model: Any) -> list[str]:
    """The exact types skops needs trusted to load ``model`` (recorded at training), checked
    against the allow-list: a model that needs anything else cannot be logged."""
    import skops.io

    untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    return check_safe_types(untrusted, "the model")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_model_dir(model_dir: Path) -> ModelDigests:
    """The digests of an MLflow sklearn model directory (at logging, of what was stored)."""
    model_dir = Path(model_dir)
    _, flavour = _parse_mlmodel(model_dir, (model_dir / MLMODEL_FILE).read_bytes())
    return ModelDigests(
        model_sha256=sha256_file(_model_file_path(model_dir, flavour)),
        mlmodel_sha256=sha256_file(model_dir / MLMODEL_FILE),
    )


def model_dir_under(root: Path, model_dir: str) -> Path:
    """``root/model_dir``, refused when ``model_dir`` is absolute or leaves ``root``."""
    from airmlops.paths import safe_join

    try:
        return safe_join(Path(root), model_dir)
    except ValueError as error:
        raise ModelLoadError(f"model_dir: expected a folder inside {root}: {error}") from None


def check_model_dir(model_dir: Path, expected: ModelDigests) -> CheckedModelFile:
    """Check an MLflow model directory without constructing anything (steps 1-3 above)."""
    import skops.io

    model_dir = Path(model_dir)
    mlmodel_bytes = _read(model_dir / MLMODEL_FILE, model_dir)
    _check_digest(mlmodel_bytes, expected.mlmodel_sha256, f"{model_dir}/{MLMODEL_FILE}",
                  MLMODEL_SHA256_TAG)
    recorded, flavour = _parse_mlmodel(model_dir, mlmodel_bytes)
    path = _model_file_path(model_dir, flavour)
    data = _read(path, model_dir)
    _check_digest(data, expected.model_sha256, str(path), MODEL_SHA256_TAG)
    try:
        needed = skops.io.get_untrusted_types(data=data)
    except Exception as error:  # a zip or schema skops cannot read
        raise ModelLoadError(f"{path} is not a readable skops file: {error}") from None
    not_recorded = sorted(set(needed) - set(recorded))
    if not_recorded:
        raise ModelLoadError(f"{path} needs types not recorded at training "
                             f"(MLmodel skops_trusted_types): {not_recorded}")
    trusted = check_safe_types(needed, str(path))
    return CheckedModelFile(path=path, data=data, trusted_types=tuple(trusted))


def load_model_dir(model_dir: Path, expected: ModelDigests) -> Any:
    """The scikit-learn model of an MLflow model directory, after every check passed."""
    import skops.io

    checked = check_model_dir(model_dir, expected)
    return skops.io.loads(checked.data, trusted=list(checked.trusted_types))


@contextlib.contextmanager
def using_tracking_uri(tracking_uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API (runs, model logging and loading) at ``tracking_uri`` for a while.

    With None, nothing changes. The previous URI is restored afterwards.
    """
    import mlflow

    if tracking_uri is None:
        yield
        return
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def registered_digests(model_uri: str, tracking_uri: str | None) -> ModelDigests:
    """The digests recorded for ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (the
    version's tags) or ``models:/m-<id>`` (the logged model's, or its run's, tags)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = model_uri.removeprefix("models:/")
    if not model_uri.startswith("models:/") or not rest:
        raise ModelLoadError(f"model_uri: expected models:/<name>/<version>, "
                             f"models:/<name>@<alias> or models:/<model id>, got {model_uri!r}")
    if "/" in rest:
        name, _, version = rest.partition("/")
        tags = client.get_model_version(name, version).tags
    elif "@" in rest:
        name, _, alias = rest.partition("@")
        tags = client.get_model_version_by_alias(name, alias).tags
    else:
        logged = client.get_logged_model(rest)
        tags = dict(logged.tags or {})
        if not all(tags.get(field) for field in DIGEST_TAGS) and logged.source_run_id:
            tags = client.get_run(logged.source_run_id).data.tags
    return ModelDigests.from_tags(tags, model_uri)


def load_registered_model(model_uri: str, tracking_uri: str | None) -> Any:
    """Download ``model_uri`` from MLflow and load it with :func:`load_model_dir`, checked
    against the digests the registry recorded for it (the gates and the bake stage)."""
    import mlflow

    expected = registered_digests(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="airmlops-model-") as scratch:
        # MLflow resolves a models:/ URI through the global tracking (= registry) URI.
        with using_tracking_uri(tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=scratch, tracking_uri=tracking_uri,
                registry_uri=tracking_uri)
        return load_model_dir(model_dir_under(Path(scratch), _relative(local, scratch)),
                              expected)


def _relative(local: str, scratch: str) -> str:
    relative = Path(local).resolve().relative_to(Path(scratch).resolve()).as_posix()
    return relative or "."


def _read(path: Path, model_dir: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{model_dir}: cannot read {Path(path).name}: "
                             f"{error.strerror}") from None


def _check_digest(data: bytes, expected: str, where: str, field: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise ModelLoadError(f"{where} does not match the {field} recorded for this model "
                             f"(expected {expected[:12]}..., found {actual[:12]}...): the "
                             "artifact was changed after it was logged")


def _parse_mlmodel(model_dir: Path, data: bytes) -> tuple[list[str], dict[str, Any]]:
    """(recorded trusted types, sklearn flavour) of an MLmodel file's bytes."""
    import yaml

    try:
        mlmodel = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ModelLoadError(f"{model_dir}/{MLMODEL_FILE} is not valid YAML: {error}") from None
    flavours = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    flavour = flavours.get("sklearn") if isinstance(flavours, dict) else None
    if not isinstance(flavour, dict):
        raise ModelLoadError(f"{model_dir}/{MLMODEL_FILE}: flavors.sklearn: expected an MLflow "
                             "scikit-learn model")
    serialization = flavour.get("serialization_format")
    if serialization != SKOPS_FORMAT:
        raise ModelLoadError(
            f"{model_dir}/{MLMODEL_FILE}: flavors.sklearn.serialization_format is "
            f"{serialization!r}; only the skops format is loaded (pickle and cloudpickle run "
            "code when loaded)")
    recorded = flavour.get("skops_trusted_types") or []
    if not isinstance(recorded, list) or not all(isinstance(n, str) for n in recorded):
        raise ModelLoadError(f"{model_dir}/{MLMODEL_FILE}: flavors.sklearn.skops_trusted_types: "
                             "expected a list of type names")
    return recorded, flavour


def _model_file_path(model_dir: Path, flavour: Mapping[str, Any]) -> Path:
    from airmlops.paths import safe_join

    name = flavour.get("pickled_model") or "model.skops"
    try:
        return safe_join(model_dir, str(name))
    except ValueError as error:
        raise ModelLoadError(f"{model_dir}/{MLMODEL_FILE}: flavors.sklearn.pickled_model: "
                             f"expected a file inside the model directory: {error}") from None
