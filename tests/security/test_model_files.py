"""Models are data: malicious model artifacts are refused by every loader, and run nothing.

Each malicious skops file is built for real, by editing the schema inside the zip of a genuine
model so that loading it would call a dangerous callable with arguments that create a marker
file. One test shows the same file does create the marker when skops is told to trust the type
(the old rule: any name under sklearn/numpy/scipy, or whatever MLmodel lists); every other test
asserts the refusal with a clear error and that the marker does not exist.

Entry points: the model service's loader (``service.load_model``), the champion gate
(``gates.evaluate_against_champion``) and the bake stage (``stages.record_reference``), the last
two through a real MLflow registry (SQLite store, local artifact store) whose artifacts an
attacker swapped.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from airmlops.model_files import ModelDigests, ModelLoadError
from airmlops.serving.service import ServingConfig, load_model
from airmlops.spec import parse_spec, resolve_estimator
from airmlops.training.model import build_pipeline, feature_frame, label_array

SPEC = {
    "name": "toy",
    "task": "binary_classification",
    "source": {"kind": "file", "path": "toy.parquet"},
    "entity_key": "id",
    "timestamp": "ts",
    "label": "y",
    "features": [{"name": "x1", "type": "numeric"}, {"name": "x2", "type": "numeric"}],
    "estimator": {"class_path": "sklearn.tree.DecisionTreeClassifier",
                  "params": {"max_depth": 3}},
    "gates": {"primary_metric": "roc_auc",
              "champion": {"n_bootstrap": 100, "confidence": 0.9, "max_regression": 0.01}},
}


# --- building the model and the payloads ------------------------------------------------------


def _frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="h")
    return pd.DataFrame({"id": np.arange(n), "ts": ts, "x1": x1, "x2": x2,
                         "y": (x1 + 0.3 * x2 > 0).astype(int)})


def _fitted(spec):
    frame = _frame()
    model = build_pipeline(spec, resolve_estimator(spec))
    return model.fit(feature_frame(spec, frame), label_array(spec, frame))


def _json_str(value: str) -> dict:
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True, "__id__": 1}


def _call_node(module: str, name: str, *args: dict) -> dict:
    """A schema node that makes skops call ``module.name(*args)`` when it constructs it."""
    return {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode",
            "content": {"__class__": "tuple", "__module__": "builtins",
                        "__loader__": "TupleNode", "content": list(args), "__id__": 2},
            "__id__": 3}


def _bool(value: bool) -> dict:
    return {"__class__": "bool", "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True, "__id__": 4}


def _none() -> dict:
    return {"__class__": "NoneType", "__module__": "builtins", "__loader__": "JsonNode",
            "content": "null", "is_json": True, "__id__": 5}


class _WritesMarker:
    """Unpickling this creates the marker (the ``numpy.load(allow_pickle=True)`` payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _payload(kind: str, marker: Path, scratch: Path) -> tuple[str, dict]:
    """(type name skops reports, schema node) of a payload that would create ``marker``."""
    script = f"open({str(marker)!r}, 'w').write('pwned')"
    if kind == "assert_run_python_script":
        name = "sklearn.utils._testing.assert_run_python_script_without_output"
        return name, _call_node("sklearn.utils._testing",
                                "assert_run_python_script_without_output", _json_str(script))
    if kind == "builtins_eval":
        return "builtins.eval", _call_node("builtins", "eval", _json_str(script))
    if kind == "builtins_exec":
        return "builtins.exec", _call_node("builtins", "exec", _json_str(script))
    if kind == "os_system":
        return "os.system", _call_node(
            "os", "system", _json_str(f"{sys.executable} -c \"{script}\""))
    if kind == "subprocess_popen":
        return "subprocess.Popen", _call_node(
            "subprocess", "Popen", {"__class__": "list", "__module__": "builtins",
                                    "__loader__": "ListNode", "__id__": 6, "content": [
                                        _json_str(sys.executable), _json_str("-c"),
                                        _json_str(script)]})
    if kind == "numpy_load_allow_pickle":
        pickled = scratch / "payload.npy"
        pickled.write_bytes(pickle.dumps(_WritesMarker(marker)))
        return "numpy.load", _call_node("numpy", "load", _json_str(str(pickled)), _none(),
                                        _bool(True))
    if kind == "sklearn_testing_other":
        name = "sklearn.utils._testing.create_memmap_backed_data"
        return name, _call_node("sklearn.utils._testing", "create_memmap_backed_data",
                                _json_str(script))
    if kind == "operator_attrgetter":
        return "operator.attrgetter", _call_node("operator", "attrgetter",
                                                 _json_str("system"))
    if kind == "functools_partial":
        return "functools.partial", _call_node("functools", "partial", _json_str("os.system"))
    if kind == "sklearn_named_builtin":  # a name under sklearn that is not a safe class
        name = "sklearn.utils._joblib.load"
        return name, _call_node("sklearn.utils._joblib", "load", _json_str(str(marker)))
    raise AssertionError(kind)


PAYLOADS = [
    "assert_run_python_script", "builtins_eval", "builtins_exec", "os_system",
    "subprocess_popen", "numpy_load_allow_pickle", "sklearn_testing_other",
    "operator_attrgetter", "functools_partial", "sklearn_named_builtin",
]


def _with_payload(model_file: bytes, node: dict) -> bytes:
    """The genuine skops file with one more attribute on the Pipeline: the payload."""
    with zipfile.ZipFile(io.BytesIO(model_file)) as source:
        members = {name: source.read(name) for name in source.namelist()}
    schema = json.loads(members["schema.json"])
    state = schema["content"]
    state["content"]["_payload"] = node
    state["key_types"]["content"].append(
        {"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode", "__id__": 7})
    members["schema.json"] = json.dumps(schema).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for name, data in members.items():
            target.writestr(name, data)
    return out.getvalue()


def _set_trusted(model_dir: Path, extra: list[str]) -> None:
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    flavour = mlmodel["flavors"]["sklearn"]
    flavour["skops_trusted_types"] = sorted({*flavour.get("skops_trusted_types", []), *extra})
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _digests(model_dir: Path) -> ModelDigests:
    from airmlops.model_files import digest_model_dir

    return digest_model_dir(model_dir)


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def spec():
    return parse_spec(SPEC)


@pytest.fixture(scope="module")
def genuine_dir(spec, tmp_path_factory) -> Path:
    """A genuine model directory saved the way training saves it (skops, recorded types)."""
    import mlflow.sklearn

    from airmlops.training.tracking import pinned_requirements, skops_trusted_types

    model = _fitted(spec)
    where = tmp_path_factory.mktemp("genuine") / "model"
    mlflow.sklearn.save_model(model, str(where), serialization_format="skops",
                              skops_trusted_types=skops_trusted_types(model),
                              pip_requirements=pinned_requirements())
    return where


@pytest.fixture
def bento_root(genuine_dir, tmp_path) -> Path:
    root = tmp_path / "bento"
    shutil.copytree(genuine_dir, root / "model")
    return root


def _config(digests: ModelDigests | None, model_dir: str = "model") -> ServingConfig:
    extra = digests.to_tags() if digests else {}
    return ServingConfig(pipeline="toy", model_name="toy", model_version="1",
                         model_uri="models:/toy/1", model_dir=model_dir, spec_hash="s",
                         features_hash="f", **extra)


def _make_malicious(model_dir: Path, kind: str, marker: Path, *, list_in_mlmodel: bool) -> str:
    name, node = _payload(kind, marker, model_dir.parent)
    model_file = model_dir / "model.skops"
    model_file.write_bytes(_with_payload(model_file.read_bytes(), node))
    if list_in_mlmodel:
        _set_trusted(model_dir, [name])
    return name


# --- the case is real -------------------------------------------------------------------------


def test_the_payload_runs_under_the_old_trust_rule(bento_root, tmp_path):
    """The crafted file is a real attack: trusting what its MLmodel lists runs the script."""
    import skops.io

    marker = tmp_path / "pwned"
    name = _make_malicious(bento_root / "model", "assert_run_python_script", marker,
                           list_in_mlmodel=True)
    assert name.split(".")[0] == "sklearn"  # the old rule trusted any sklearn.* name
    assert name in skops.io.get_untrusted_types(file=bento_root / "model" / "model.skops")
    listed = yaml.safe_load((bento_root / "model" / "MLmodel").read_text())
    skops.io.load(bento_root / "model" / "model.skops",
                  trusted=listed["flavors"]["sklearn"]["skops_trusted_types"])
    assert marker.read_text() == "pwned"


def test_the_genuine_model_loads_through_the_service_loader(bento_root, spec):
    model = load_model(bento_root, _config(_digests(bento_root / "model")))
    frame = _frame()
    assert model.predict_proba(feature_frame(spec, frame)).shape == (len(frame), 2)


# --- the model service's loader ---------------------------------------------------------------


@pytest.mark.parametrize("kind", PAYLOADS)
def test_service_refuses_a_dangerous_type_even_with_matching_digests(bento_root, tmp_path, kind):
    """The attacker also controls the recorded digests and MLmodel's list: the allow-list holds."""
    marker = tmp_path / "pwned"
    name = _make_malicious(bento_root / "model", kind, marker, list_in_mlmodel=True)
    with pytest.raises(ModelLoadError, match="outside the platform's allow-list") as error:
        load_model(bento_root, _config(_digests(bento_root / "model")))
    assert name in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["assert_run_python_script", "builtins_eval", "os_system"])
def test_service_refuses_a_type_not_recorded_at_training(bento_root, tmp_path, kind):
    marker = tmp_path / "pwned"
    name = _make_malicious(bento_root / "model", kind, marker, list_in_mlmodel=False)
    with pytest.raises(ModelLoadError, match="not recorded at training") as error:
        load_model(bento_root, _config(_digests(bento_root / "model")))
    assert name in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["assert_run_python_script", "builtins_eval", "os_system"])
def test_service_refuses_a_model_file_swapped_after_logging(bento_root, tmp_path, kind):
    marker = tmp_path / "pwned"
    recorded = _digests(bento_root / "model")
    _make_malicious(bento_root / "model", kind, marker, list_in_mlmodel=False)
    with pytest.raises(ModelLoadError, match="does not match the model_sha256 recorded"):
        load_model(bento_root, _config(recorded))
    assert not marker.exists()


def test_service_refuses_an_mlmodel_that_adds_trusted_types(bento_root, tmp_path):
    marker = tmp_path / "pwned"
    recorded = _digests(bento_root / "model")
    name, _ = _payload("assert_run_python_script", marker, tmp_path)
    _set_trusted(bento_root / "model", [name])
    with pytest.raises(ModelLoadError, match="does not match the mlmodel_sha256 recorded"):
        load_model(bento_root, _config(recorded))
    assert not marker.exists()


@pytest.mark.parametrize("serialization", ["pickle", "cloudpickle"])
def test_service_refuses_a_pickled_model(bento_root, tmp_path, serialization):
    """An MLmodel saying pickle is refused before its model file is even read."""
    marker = tmp_path / "pwned"
    model_dir = bento_root / "model"
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"].update(serialization_format=serialization,
                                         pickled_model="model.pkl")
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (model_dir / "model.pkl").write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(ModelLoadError,
                       match=r"serialization_format is '[a-z]*pickle'; only the skops"):
        load_model(bento_root, _config(_digests_of_files(model_dir, "model.pkl")))
    assert not marker.exists()


def _digests_of_files(model_dir: Path, model_file: str) -> ModelDigests:
    sha = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    return ModelDigests(sha(model_dir / model_file), sha(model_dir / "MLmodel"))


def test_service_refuses_a_bento_without_recorded_digests(bento_root):
    with pytest.raises(ModelLoadError,
                       match=r"serving\.json has no model_sha256 or mlmodel_sha256"):
        load_model(bento_root, _config(None))


@pytest.mark.parametrize("model_dir", ["../outside", "/etc", "model/../../outside"],
                         ids=["dotdot", "absolute", "nested-dotdot"])
def test_service_refuses_a_model_dir_outside_the_bento(bento_root, tmp_path, model_dir):
    outside = tmp_path / "outside"
    shutil.copytree(bento_root / "model", outside)
    before = _snapshot(tmp_path)
    with pytest.raises(ModelLoadError, match="model_dir: expected a folder inside"):
        load_model(bento_root, _config(_digests(outside), model_dir=model_dir))
    assert _snapshot(tmp_path) == before


def test_service_refuses_a_model_file_outside_the_model_dir(bento_root, tmp_path):
    model_dir = bento_root / "model"
    shutil.copyfile(model_dir / "model.skops", tmp_path / "elsewhere.skops")
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"]["pickled_model"] = "../../elsewhere.skops"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ModelLoadError, match="pickled_model: expected a file inside"):
        load_model(bento_root, _config(_digests_of_files(model_dir, "model.skops")))


# --- the gates and the bake stage, through a real registry ------------------------------------


@pytest.fixture(scope="module")
def stored_registry(spec, tmp_path_factory):
    """A SQLite MLflow with two registered versions of the toy model (logged as training does)."""
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    from airmlops.training.tracking import (
        pinned_requirements,
        record_digests,
        skops_trusted_types,
    )

    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("toy", artifact_location=(tmp_path / "a").as_uri())
    client.create_registered_model("toy")
    mlflow.set_tracking_uri(uri)
    try:
        for _ in range(2):
            model = _fitted(spec)
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.sklearn.log_model(
                    model, name="model", serialization_format="skops",
                    skops_trusted_types=skops_trusted_types(model),
                    pip_requirements=pinned_requirements())
                digests = record_digests(client, info.model_uri, info.model_id, uri)
            client.create_model_version("toy", source=info.model_uri, tags=digests.to_tags(),
                                        model_id=info.model_id)
    finally:
        mlflow.set_tracking_uri(None)
    return uri, client, tmp_path / "a"


@pytest.fixture
def registry(stored_registry):
    """The registry, restored after the test (its artifacts and its version tags)."""
    _, client, artifacts = stored_registry
    backup = artifacts.with_name("backup")
    shutil.copytree(artifacts, backup)
    tags = {v: dict(client.get_model_version("toy", v).tags) for v in ("1", "2")}
    yield stored_registry
    shutil.rmtree(artifacts)
    backup.rename(artifacts)
    for version, saved in tags.items():
        for key, value in saved.items():
            client.set_model_version_tag("toy", version, key, value)


def _stored_dir(client, artifacts: Path, version: str) -> Path:
    model_id = client.get_model_version("toy", version).source.removeprefix("models:/")
    [mlmodel] = [p for p in artifacts.rglob("MLmodel") if model_id in p.as_posix()]
    return mlmodel.parent


def _gate(spec, uri):
    from airmlops.training.gates import evaluate_against_champion

    return evaluate_against_champion(spec, _frame(), "models:/toy/2", "models:/toy/1",
                                     tracking_uri=uri)


def _bake(spec, uri, tmp_path):
    from airmlops.contracts import TrainedModel
    from airmlops.settings import Settings
    from airmlops.stages import record_reference

    test_path = tmp_path / "test.parquet"
    _frame().to_parquet(test_path)
    settings = Settings(data_root=tmp_path / "data", mlflow_tracking_uri=uri)
    trained = TrainedModel(run_id="0" * 32, model_uri="models:/toy/1", metrics={},
                           train_path=str(test_path), test_path=str(test_path), lineage={})
    return record_reference(spec, "1", trained, settings)


ENTRY_POINTS = {"gate": lambda spec, uri, tmp: _gate(spec, uri),
                "bake": _bake}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_registry_entry_points_load_a_genuine_model(registry, spec, tmp_path, entry):
    uri, _, _ = registry
    assert ENTRY_POINTS[entry](spec, uri, tmp_path) is not None


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", ["assert_run_python_script", "numpy_load_allow_pickle"])
def test_registry_entry_points_refuse_an_artifact_swapped_in_the_store(
        registry, spec, tmp_path, entry, kind):
    uri, client, artifacts = registry
    marker = tmp_path / "pwned"
    stored = _stored_dir(client, artifacts, "1")
    _make_malicious(stored, kind, marker, list_in_mlmodel=True)
    with pytest.raises(ModelLoadError, match="does not match the mlmodel_sha256 recorded"):
        ENTRY_POINTS[entry](spec, uri, tmp_path)
    assert not marker.exists()
    assert not (tmp_path / "data" / "monitoring").exists()  # no reference was recorded


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_registry_entry_points_refuse_a_dangerous_type_with_rewritten_tags(
        registry, spec, tmp_path, entry):
    """The attacker swapped the files AND rewrote the version's digest tags: the types hold."""
    uri, client, artifacts = registry
    marker = tmp_path / "pwned"
    stored = _stored_dir(client, artifacts, "1")
    name = _make_malicious(stored, "builtins_eval", marker, list_in_mlmodel=True)
    for key, value in _digests(stored).to_tags().items():
        client.set_model_version_tag("toy", "1", key, value)
    with pytest.raises(ModelLoadError, match="outside the platform's allow-list") as error:
        ENTRY_POINTS[entry](spec, uri, tmp_path)
    assert name in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_registry_entry_points_refuse_a_version_without_digests(
        registry, spec, tmp_path, entry):
    uri, client, _ = registry
    for key in ("model_sha256", "mlmodel_sha256"):
        client.delete_model_version_tag("toy", "1", key)
    with pytest.raises(ModelLoadError, match="models:/toy/1 has no model_sha256"):
        ENTRY_POINTS[entry](spec, uri, tmp_path)
    assert not (tmp_path / "data" / "monitoring").exists()


def test_tampered_copy_is_not_the_genuine_one(genuine_dir, tmp_path):
    """Guard for the cases above: the payload changes the file's digest."""
    copied = tmp_path / "m"
    shutil.copytree(genuine_dir, copied)
    before = copy.deepcopy(_digests(copied))
    _make_malicious(copied, "builtins_eval", tmp_path / "x", list_in_mlmodel=False)
    assert _digests(copied).model_sha256 != before.model_sha256
