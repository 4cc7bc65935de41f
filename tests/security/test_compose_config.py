"""The compose stack's defaults, checked without starting it (issue 13, point 9).

``docker-compose config`` (Debian's v1, installed by scripts/ensure-compose.sh) renders
docker-compose.yaml with each of its override files from an env file holding generated secrets,
in an environment holding nothing else. Without any one secret it must refuse, naming the
variable and rendering nothing; with all of them the rendered stack must have no default
password, Redis with ``requirepass`` and every client URL carrying it, MLflow's basic-auth app,
and Airflow's FAB auth manager. The image's entrypoint is run for real (its MLflow auth file and
its admin-user step), and the model containers' confinement options are checked as built.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from airmlops.serving.container import ContainerResources, hardened_run_options
from airmlops.settings import PROJECT_ROOT

FILE_SETS = {
    "published-ports": ("docker-compose.yaml", "docker-compose.override.yaml"),
    "host-network": ("docker-compose.yaml", "docker-compose.host.yaml"),
}
SECRETS = (
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_JWT_SECRET",
    "_AIRFLOW_WWW_USER_PASSWORD",
    "POSTGRES_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "REDIS_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_SECRET_KEY",
)
"""Every secret the stack needs; none may have a default."""
WEAK_PASSWORDS = {"airflow", "mlflow", "admin", "password", "redis", "postgres", "secret", ""}
AIRFLOW_SERVICES = (
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
    "airflow-triggerer", "airflow-worker",
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|_AUTH$|TOKEN", re.IGNORECASE)
URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"']+")
ENTRYPOINT = PROJECT_ROOT / "docker" / "entrypoint.sh"


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    assert found, "docker-compose is missing: run scripts/ensure-compose.sh (it installs it)"
    return found


def generated_secrets() -> dict[str, str]:
    return {name: secrets.token_hex(24) for name in SECRETS}


def compose_config(files: tuple[str, ...], values: dict[str, str], tmp_path: Path
                   ) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of ``files`` with exactly ``values`` (plus the env_file)."""
    settings = tmp_path / "settings.env"
    settings.write_text("")
    env_file = tmp_path / "compose.env"
    lines = {**values, "AIRMLOPS_ENV_FILE": str(settings)}
    env_file.write_text("".join(f"{key}={value}\n" for key, value in lines.items()))
    argv = [_docker_compose(), "--env-file", str(env_file), "-p", "airmlops-config-check"]
    for name in files:
        argv += ["-f", str(PROJECT_ROOT / name)]
    # Nothing from this process's environment: only the env file can provide a secret.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run([*argv, "config"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module", params=sorted(FILE_SETS), ids=str)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict, dict[str, str]]:
    """The stack as compose renders it with generated secrets, and those secrets."""
    values = generated_secrets()
    result = compose_config(FILE_SETS[request.param], values,
                            tmp_path_factory.mktemp(f"config-{request.param}"))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout), values


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict) -> str:
    cmd = service.get("command") or []
    return cmd if isinstance(cmd, str) else " ".join(str(part) for part in cmd)


# --- without a secret, nothing starts ----------------------------------------------------------


@pytest.mark.parametrize("files", sorted(FILE_SETS), ids=str)
@pytest.mark.parametrize("missing", SECRETS, ids=str)
def test_config_refuses_to_render_without_a_secret(missing: str, files: str, tmp_path: Path):
    values = generated_secrets()
    del values[missing]
    result = compose_config(FILE_SETS[files], values, tmp_path)
    assert result.returncode != 0, f"config rendered without {missing}"
    assert f"set {missing} in .env" in result.stderr, result.stderr
    # Nothing rendered, and the error carries none of the other secrets.
    assert "services:" not in result.stdout
    for value in values.values():
        assert value not in result.stdout + result.stderr


@pytest.mark.parametrize("empty", SECRETS, ids=str)
def test_config_refuses_an_empty_secret(empty: str, tmp_path: Path):
    values = {**generated_secrets(), empty: ""}
    result = compose_config(FILE_SETS["published-ports"], values, tmp_path)
    assert result.returncode != 0, f"config rendered with an empty {empty}"
    assert f"set {empty} in .env" in result.stderr, result.stderr
    assert "services:" not in result.stdout


# --- with every secret: no default password, and each server demands one ----------------------


@pytest.mark.parametrize("service_name", [
    "postgres", "redis", "mlflow", *AIRFLOW_SERVICES], ids=str)
def test_no_service_has_a_default_password(rendered, service_name: str):
    config, values = rendered
    service = config["services"][service_name]
    generated = set(values.values())
    env = environment(service)
    for name, value in env.items():
        if SECRET_NAME.search(name):
            assert value not in WEAK_PASSWORDS, f"{service_name}: {name} has a default value"
            assert value in generated, (
                f"{service_name}: {name} does not come from the secrets in .env")
    # Every credential inside a URL (database, broker, Redis) is one of the generated secrets.
    for text in [*env.values(), command(service)]:
        for url in URL_IN_TEXT.findall(text):
            password = urlsplit(url).password
            if urlsplit(url).username is not None or password is not None:
                assert password in generated, f"{service_name}: {url.split('@')[-1]} has a " \
                                              "password that is not a generated secret"


def test_redis_runs_with_requirepass(rendered):
    config, values = rendered
    redis = config["services"]["redis"]
    # `config` prints the command re-escaped for compose (`$$` for one `$` reaching the shell).
    assert re.search(r'--requirepass "\$\$?REDIS_PASSWORD"', command(redis)), command(redis)
    env = environment(redis)
    assert env["REDIS_PASSWORD"] == values["REDIS_PASSWORD"]
    # The health check authenticates through REDISCLI_AUTH, not a password argument.
    assert env["REDISCLI_AUTH"] == values["REDIS_PASSWORD"]
    assert values["REDIS_PASSWORD"] not in " ".join(redis["healthcheck"]["test"])


@pytest.mark.parametrize("service_name", AIRFLOW_SERVICES, ids=str)
def test_every_redis_client_url_carries_the_password(rendered, service_name: str):
    config, values = rendered
    env = environment(config["services"][service_name])
    urls = {name: env[name] for name in ("AIRFLOW__CELERY__BROKER_URL", "MLOPS_REDIS_URL")}
    for name, url in urls.items():
        parts = urlsplit(url)
        assert parts.scheme == "redis", (name, parts.scheme)
        assert parts.password == values["REDIS_PASSWORD"], f"{service_name}: {name} has no password"


def test_mlflow_runs_the_basic_auth_app(rendered):
    config, values = rendered
    mlflow = config["services"]["mlflow"]
    assert re.search(r"mlflow server --app-name basic-auth\b", command(mlflow)), command(mlflow)
    env = environment(mlflow)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == values["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == values["MLFLOW_SECRET_KEY"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"].startswith("/")
    assert urlsplit(env["MLFLOW_AUTH_DATABASE_URI"]).password == values["MLFLOW_DB_PASSWORD"]
    # Still healthy-checkable: /health is the one path the auth app leaves open.
    assert mlflow["healthcheck"]["test"][-1].endswith("/health")


@pytest.mark.parametrize("service_name", AIRFLOW_SERVICES, ids=str)
def test_airflow_uses_the_fab_auth_manager(rendered, service_name: str):
    config, values = rendered
    env = environment(config["services"][service_name])
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == (
        "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager")
    assert not [name for name in env if "SIMPLE_AUTH_MANAGER" in name]
    # The platform's MLflow clients log in.
    assert env["MLFLOW_TRACKING_PASSWORD"] == values["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_TRACKING_USERNAME"]


@pytest.mark.parametrize("service_name", [s for s in AIRFLOW_SERVICES if s != "airflow-init"],
                         ids=str)
def test_admin_password_reaches_only_airflow_init(rendered, service_name: str):
    config, values = rendered
    assert environment(config["services"]["airflow-init"])["_AIRFLOW_WWW_USER_PASSWORD"] == (
        values["_AIRFLOW_WWW_USER_PASSWORD"])
    env = environment(config["services"][service_name])
    assert values["_AIRFLOW_WWW_USER_PASSWORD"] not in env.values()


# --- the image's entrypoint, run for real -------------------------------------------------------


def _run_entrypoint(args: list[str], env: dict[str, str], tmp_path: Path
                    ) -> subprocess.CompletedProcess[str]:
    base = {"PATH": f"{tmp_path / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_entrypoint_writes_the_mlflow_auth_config_owner_only(tmp_path: Path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    password = "p%40ss-" + secrets.token_hex(8)  # a '%' survives MLflow's interpolation
    uri = f"postgresql+psycopg2://mlflow:{password}@postgres:5432/mlflow"
    config_path = tmp_path / "auth" / "basic_auth.ini"
    admin_password = secrets.token_hex(16)
    result = _run_entrypoint(["true"], {"MLFLOW_AUTH_CONFIG_PATH": str(config_path),
                                        "MLFLOW_AUTH_DATABASE_URI": uri,
                                        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert admin_password not in config_path.read_text()  # MLflow reads it from the environment
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(config_path))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    auth = read_auth_config()
    assert auth.database_uri == uri
    assert auth.default_permission == "NO_PERMISSIONS"
    assert auth.admin_password is None  # no password from a file: only from the environment


@pytest.mark.parametrize("password", [None, ""], ids=["unset", "empty"])
def test_airflow_init_refuses_without_an_admin_password(password: str | None, tmp_path: Path):
    # A stand-in `airflow` on PATH records any call: nothing may be migrated or created.
    calls = tmp_path / "airflow-calls"
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "airflow"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    stub.chmod(0o755)
    env = {"_AIRFLOW_WWW_USER_USERNAME": "airflow"}
    if password is not None:
        env["_AIRFLOW_WWW_USER_PASSWORD"] = password
    result = _run_entrypoint(["init"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "_AIRFLOW_WWW_USER_PASSWORD is not set" in result.stderr
    assert not calls.exists(), calls.read_text()


# --- model containers: the confinement the docker target applies --------------------------------


def test_model_containers_are_confined_and_limited():
    options = hardened_run_options(ContainerResources(memory_mb=768, cpus=0.5, pids=256),
                                   scratch_dirs=["/opt/airmlops/data"])
    assert options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges:true"]
    assert options["privileged"] is False
    assert options["read_only"] is True
    assert not options["user"].startswith("0") and options["user"] != "root"
    assert (options["mem_limit"], options["memswap_limit"]) == ("768m", "768m")
    assert options["nano_cpus"] == 500_000_000
    assert options["pids_limit"] == 256
    assert {"/tmp", "/home/bentoml/prometheus_multiproc_dir", "/opt/airmlops/data"} <= set(
        options["tmpfs"])
    assert not {"/", "/home/bentoml", "/home/bentoml/bento"} & set(options["tmpfs"])
    assert all("noexec" in flags and "nosuid" in flags for flags in options["tmpfs"].values())


@pytest.mark.parametrize(("field", "value"), [
    ("memory_mb", 16), ("memory_mb", 10**7), ("cpus", 0), ("cpus", 1000.0), ("pids", 1),
    ("pids", True), ("memory_mb", "1g"),
], ids=lambda value: str(value))
def test_unreasonable_container_resources_are_refused(field: str, value: object):
    from pydantic import ValidationError

    from airmlops.spec import DeployConfig

    with pytest.raises(ValueError, match=rf"deploy\.resources\.{field}"):
        ContainerResources(**{field: value})
    with pytest.raises(ValidationError, match=rf"resources\.{field}"):
        DeployConfig.model_validate({"resources": {field: value}})


@pytest.mark.parametrize("scratch", ["relative/dir", "/opt/../etc", "/tmp;rm -rf /", ""],
                         ids=["relative", "dotdot", "shell", "empty"])
def test_scratch_folders_must_be_plain_absolute_paths(scratch: str):
    with pytest.raises(ValueError, match="invalid scratch folder"):
        hardened_run_options(ContainerResources(), scratch_dirs=[scratch])
