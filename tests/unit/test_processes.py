"""The minimal environment of the serving processes (:func:`airmlops.processes.child_env`)."""

from __future__ import annotations

import pytest

from airmlops.processes import BENTO_BUILD, MODEL_SERVICE, PROXY, child_env, looks_secret

WORKER = {
    "PATH": "/usr/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "AIRFLOW__API_AUTH__JWT_SECRET": "jwt",
    "AIRFLOW__CORE__FERNET_KEY": "fernet",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:p@h/db",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "MLOPS_MLFLOW_TRACKING_URI": "http://u:p@127.0.0.1:5000",
    "MLOPS_GITHUB_WEBHOOK_SECRET": "gh",
    "MLOPS_SERVING_TOKEN": "own-token",
    "MLOPS_SERVING_WORKERS": "2",
    "MLOPS_SERVING_DB_PASSWORD": "not-its-own",
    "MLOPS_REDIS_URL": "redis://:pw@127.0.0.1:6379/0",
    "MLOPS_PREDICTION_LOG_BATCH_SIZE": "64",
    "BENTOML_HOME": "/store",
    "BENTOML_HOST": "0.0.0.0",
    "PYTHONPATH": "/elsewhere",
    "LD_PRELOAD": "/evil.so",
    "PIP_INDEX_URL": "https://u:p@index/simple",
}


def test_model_service_keeps_only_what_it_needs() -> None:
    env = child_env(MODEL_SERVICE, parent=WORKER)
    assert env == {
        "PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
        "MLOPS_SERVING_TOKEN": "own-token", "MLOPS_SERVING_WORKERS": "2",
        "MLOPS_REDIS_URL": "redis://:pw@127.0.0.1:6379/0",
        "MLOPS_PREDICTION_LOG_BATCH_SIZE": "64", "BENTOML_HOME": "/store",
        **MODEL_SERVICE.fixed,
    }


def test_proxy_gets_no_service_secret() -> None:
    env = child_env(PROXY, parent={**WORKER, "MLOPS_PROXY_MAX_CONNECTIONS": "10"})
    assert set(env) == {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "MLOPS_PROXY_MAX_CONNECTIONS",
                        *PROXY.fixed}


def test_bento_build_gets_its_store_and_no_platform_secret() -> None:
    env = child_env(BENTO_BUILD, {"BENTOML_HOME": "/new"}, parent=WORKER)
    assert env["BENTOML_HOME"] == "/new"
    assert not {name for name in env if name.startswith(("AIRFLOW", "MLOPS_", "AWS_"))}
    assert "PIP_INDEX_URL" not in env  # a URL may carry credentials: not copied


@pytest.mark.parametrize(
    "name",
    ["AIRFLOW__CORE__FERNET_KEY", "MLOPS_MLFLOW_TRACKING_URI", "MLOPS_SERVING_DB_PASSWORD",
     "AWS_SECRET_ACCESS_KEY", "PYTHONPATH", "LD_PRELOAD", "BENTOML_HOST"],
)
def test_an_explicit_variable_the_service_may_not_have_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"environment variable {name} may not be passed to a "
                                         "model service") as refused:
        child_env(MODEL_SERVICE, {name: "s3cr3t-value"}, parent={})
    assert "s3cr3t-value" not in str(refused.value)


@pytest.mark.parametrize("name, value", [("bad-name", "x"), ("MLOPS_SERVING_X", "a\x00b")])
def test_malformed_variables_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="environment variable"):
        child_env(MODEL_SERVICE, {name: value}, parent={})


def test_fixed_values_win_over_the_parent() -> None:
    env = child_env(MODEL_SERVICE, parent={"BENTOML_DO_NOT_TRACK": "false"})
    assert env["BENTOML_DO_NOT_TRACK"] == "true"


@pytest.mark.parametrize(
    "name, secret",
    [("AIRFLOW__CORE__DAGS_FOLDER", True), ("DATABASE_URL", True), ("X_API_KEY", True),
     ("MLOPS_SERVING_WORKERS", False), ("LC_ALL", False)],
)
def test_secret_looking_names(name: str, secret: bool) -> None:
    assert looks_secret(name) is secret
