"""Malicious pipeline specs: each is refused by ``airmlops spec check`` (the command line, in a
subprocess) and by the DAG factory, with an error naming the field, and leaves no trace.

Every case is a spec file written next to the demo spec. The checks, per case:
- the command line exits 1 and names the field; its output holds no secret value and no byte
  of a file outside the data root;
- ``build_all`` on the folder yields the case's ``<file>_invalid_spec`` DAG naming the field,
  no DAG of the bad pipeline, and every DAG of the good one;
- the side effect is absent: the file GzipFile would truncate is unchanged, the file a command
  would create does not exist, a capture server received nothing.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from airmlops.settings import PROJECT_ROOT, get_settings

DEMO = PROJECT_ROOT / "include" / "pipelines" / "churn.yaml"
GOOD_DAGS = {"churn_training", "churn_rollback", "churn_monitoring", "churn_features"}
SECRETS = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "canary-jwt-secret-4f1d",
    "AIRFLOW__CORE__FERNET_KEY": "canary-fernet-key-9a2c",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://canary-db-user:canary-db-pass@x/db",
    "MLOPS_SERVING_TOKEN": "canary-serving-token-77e0",
    "MLOPS_GITHUB_WEBHOOK_SECRET": "canary-github-secret-1b3f",
}
OUTSIDE_CANARY = "OUTSIDE_CANARY_7d1e"
VICTIM_CONTENT = b"victim file content: must survive spec check\n"


@dataclass(frozen=True)
class World:
    """Where the cases point: the data root (with links out), a folder outside it, victims."""

    data_root: Path
    outside: Path
    victim: Path
    marker: Path


@dataclass(frozen=True)
class Case:
    id: str
    field: str
    build: Callable[[dict, World], dict | bytes]
    """Returns the spec as a mapping (dumped to YAML) or as the raw bytes of the file."""


def _demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def _with(path: str, value) -> Callable[[dict, World], dict]:
    """A case that sets one dotted field of the demo spec (``{w}`` is the world)."""

    def build(spec: dict, world: World) -> dict:
        node = spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value(world) if callable(value) else value
        return spec

    return build


def _estimator(class_path: str, params: Callable[[World], dict] | dict | None = None):
    def build(spec: dict, world: World) -> dict:
        given = params(world) if callable(params) else (params or {})
        spec["estimator"] = {"class_path": class_path, "params": given}
        return spec

    return build


def _webhook(headers: dict[str, str], url: str = "https://hooks.example.com/x"):
    return _with("alerts", {"webhook": {"url": url, "headers_from_env": headers}})


def _smtp(**credentials: str):
    return _with("alerts", {"smtp": {"host": "127.0.0.1", "from": "a@example.com",
                                     "to": ["b@example.com"], **credentials}})


def _file_source(path: Callable[[World], str] | str):
    def build(spec: dict, world: World) -> dict:
        spec["source"] = {"kind": "file", "path": path(world) if callable(path) else path}
        spec["feature_store"]["events_path"] = "events/*.csv"
        spec["feature_store"]["profiles_path"] = "profiles/*.csv"
        return spec

    return build


def _store_path(field: str, path: Callable[[World], str] | str):
    def build(spec: dict, world: World) -> dict:
        spec["source"] = {"kind": "file", "path": "raw/*.csv"}
        spec["feature_store"]["events_path"] = "events/*.csv"
        spec["feature_store"]["profiles_path"] = "profiles/*.csv"
        spec["feature_store"][field] = path(world) if callable(path) else path
        return spec

    return build


def _raw(text: bytes | Callable[[], bytes]):
    return lambda spec, world: text() if callable(text) else text


def _alias_bomb() -> bytes:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 9)}]")
    return (DEMO.read_text() + "\n".join(lines) + "\n").encode()


CASES = [
    # estimator.class_path: only classifiers/regressors of all_estimators, nothing constructed
    Case("gzipfile_truncates_a_file", "estimator.class_path",
         _estimator("sklearn.datasets._covtype.GzipFile",
                    lambda w: {"filename": str(w.victim), "mode": "wb"})),
    Case("gzipfile_public_looking_path", "estimator.class_path",
         _estimator("sklearn.datasets.GzipFile",
                    lambda w: {"filename": str(w.victim), "mode": "wb"})),
    Case("testing_runs_a_python_script", "estimator.class_path",
         _estimator("sklearn.utils._testing.assert_run_python_script_without_output",
                    lambda w: {"source_code": f"open({str(w.marker)!r}, 'w')"})),
    Case("testing_minimal_classifier", "estimator.class_path",
         _estimator("sklearn.utils._testing.MinimalClassifier")),
    Case("testing_temp_memmap", "estimator.class_path",
         _estimator("sklearn.utils._testing.TempMemmap", lambda w: {"data": str(w.victim)})),
    Case("os_system", "estimator.class_path",
         _estimator("os.system", lambda w: {"command": f"touch {w.marker}"})),
    Case("subprocess_popen", "estimator.class_path",
         _estimator("subprocess.Popen", lambda w: {"args": ["touch", str(w.marker)]})),
    Case("builtins_eval", "estimator.class_path", _estimator("builtins.eval")),
    Case("dunder_traversal", "estimator.class_path",
         _estimator("sklearn.base.BaseEstimator.__init__.__globals__")),
    Case("sklearn_bunch_not_an_estimator", "estimator.class_path",
         _estimator("sklearn.utils.Bunch", {"x": 1})),
    Case("pipeline_not_a_classifier", "estimator.class_path",
         _estimator("sklearn.pipeline.Pipeline", {"steps": []})),
    Case("transformer_not_a_classifier", "estimator.class_path",
         _estimator("sklearn.preprocessing.StandardScaler")),
    Case("regressor_for_classification", "estimator.class_path",
         _estimator("sklearn.linear_model.Ridge")),
    Case("vendored_packaging_version", "estimator.class_path",
         _estimator("sklearn.externals._packaging.version.Version", {"version": "1"})),
    Case("unknown_param_filename", "estimator.params.filename",
         _estimator("sklearn.linear_model.LogisticRegression",
                    lambda w: {"filename": str(w.victim), "mode": "wb"})),
    Case("unknown_param_dunder_class", "estimator.params.__class__",
         _estimator("sklearn.linear_model.LogisticRegression", {"__class__": "os.system"})),
    # alerts: credentials only from MLOPS_ALERT_* variables, never the platform's secrets
    Case("webhook_header_jwt_secret", "alerts.webhook.headers_from_env",
         _webhook({"Authorization": "AIRFLOW__API_AUTH__JWT_SECRET"})),
    Case("webhook_header_fernet_key", "alerts.webhook.headers_from_env",
         _webhook({"X-Key": "AIRFLOW__CORE__FERNET_KEY"})),
    Case("webhook_header_database_url", "alerts.webhook.headers_from_env",
         _webhook({"X-Db": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"})),
    Case("webhook_header_serving_token", "alerts.webhook.headers_from_env",
         _webhook({"Authorization": "MLOPS_SERVING_TOKEN"})),
    Case("webhook_header_github_secret", "alerts.webhook.headers_from_env",
         _webhook({"X-Sig": "MLOPS_GITHUB_WEBHOOK_SECRET"})),
    Case("webhook_header_lower_case_prefix", "alerts.webhook.headers_from_env",
         _webhook({"X-Sig": "mlops_alert_token"})),
    Case("smtp_username_fernet_key", "alerts.smtp.username_env",
         _smtp(username_env="AIRFLOW__CORE__FERNET_KEY")),
    Case("smtp_password_database_url", "alerts.smtp.password_env",
         _smtp(password_env="AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")),
    Case("smtp_password_jwt_secret", "alerts.smtp.password_env",
         _smtp(password_env="AIRFLOW__API_AUTH__JWT_SECRET")),
    Case("webhook_to_a_private_address", "alerts.webhook.url",
         _webhook({}, url="http://10.0.0.5/collect")),
    # file paths: confined to the data root after resolving symbolic links
    Case("source_etc_passwd", "source.path", _file_source("/etc/passwd")),
    Case("source_absolute_glob", "source.path", _file_source("/etc/*.conf")),
    Case("source_proc_environ", "source.path", _file_source("/proc/self/environ")),
    Case("source_dot_dot", "source.path", _file_source("../../etc/passwd")),
    Case("source_absolute_outside_file", "source.path",
         _file_source(lambda w: str(w.outside / "secret.csv"))),
    Case("source_symlinked_folder", "source.path", _file_source("link/*.csv")),
    Case("source_symlinked_folder_recursive", "source.path", _file_source("link/**/*.csv")),
    Case("source_symlinked_file", "source.path", _file_source("inner/evil.csv")),
    Case("source_nul_byte", "source.path", _file_source("raw/a\x00.csv")),
    Case("events_path_etc_passwd", "feature_store.events_path",
         _store_path("events_path", "/etc/passwd")),
    Case("events_path_dot_dot", "feature_store.events_path",
         _store_path("events_path", "raw/../../outside/*.csv")),
    Case("profiles_path_symlink", "feature_store.profiles_path",
         _store_path("profiles_path", "link/secret.csv")),
    Case("profiles_path_absolute_outside", "feature_store.profiles_path",
         _store_path("profiles_path", lambda w: str(w.outside / "*.csv"))),
    # YAML: size, encoding, aliases, nesting, tags
    Case("alias_bomb", "(file)", _raw(_alias_bomb)),
    Case("single_alias", "(file)", _raw(b"name: &n churn\nowner: *n\n")),
    Case("deep_nesting_lists", "(file)", _raw(b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n")),
    Case("deep_nesting_mappings", "(file)",
         _raw(lambda: ("".join(f"{'  ' * i}k{i}:\n" for i in range(60)) + "  " * 60 + "v: 1\n")
              .encode())),
    Case("non_utf8_bytes", "(file)",
         _raw(lambda: DEMO.read_bytes().replace(b"churn", b"ch\xffrn", 1))),
    Case("utf16_file", "(file)", _raw(lambda: DEMO.read_text().encode("utf-16"))),
    Case("oversized_file", "(file)",
         _raw(lambda: DEMO.read_bytes() + b"# padding\n" * 30_000)),
    Case("python_object_apply_tag", "(file)",
         _raw(b"name: !!python/object/apply:os.system ['touch /tmp/airmlops-pwned']\n")),
    Case("python_name_tag", "(file)", _raw(b"estimator: !!python/name:os.system\n")),
    Case("huge_integer_literal", "(file)",
         _raw(lambda: DEMO.read_bytes() + b"\nseed_bomb: " + b"9" * 100_000 + b"\n")),
    Case("top_level_list", "(top level)", _raw(b"- name: churn\n")),
    # schedules: presets or five-field cron, checked at load
    Case("schedule_every_day", "schedule", _with("schedule", "every day")),
    Case("schedule_unknown_preset", "schedule", _with("schedule", "@sometimes")),
    Case("schedule_seven_fields", "schedule", _with("schedule", "* * * * * * *")),
    Case("schedule_shell_suffix", "schedule", _with("schedule", "0 0 * * *; rm -rf /")),
    Case("features_schedule_out_of_range", "feature_store.schedule",
         _with("feature_store.schedule", "61 * * * *")),
    Case("monitoring_schedule_words", "monitoring.schedule",
         _with("monitoring.schedule", "every hour")),
    # valid cron syntax that never fires fails only when Airflow computes the next run
    Case("schedule_february_30", "schedule", _with("schedule", "0 3 30 2 *")),
    Case("features_schedule_april_31", "feature_store.schedule",
         _with("feature_store.schedule", "0 0 31 4 *")),
    Case("name_path_traversal", "name", _with("name", "../../etc/evil")),
]


def _spec_bytes(case: Case, world: World, index: int) -> bytes:
    spec = _demo()
    spec["name"] = f"evil_{index}"
    built = case.build(copy.deepcopy(spec), world)
    return built if isinstance(built, bytes) else yaml.safe_dump(built).encode()


def _file_name(case: Case) -> str:
    return f"evil_{case.id}.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """The session's data root (what build_all and the CLI use) with links that lead out,
    removed afterwards (other suites share that data root)."""
    data_root = Path(get_settings().data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    base = tmp_path_factory.mktemp("malicious")
    outside = base / "outside"
    (outside / "deeper").mkdir(parents=True)
    for path in (outside / "secret.csv", outside / "deeper" / "secret.csv"):
        path.write_text(f"{OUTSIDE_CANARY},event_timestamp\n1,2026-01-01\n")
    links = ((data_root / "link", outside),
             (data_root / "inner" / "evil.csv", outside / "secret.csv"))
    for link, target in links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target)
    victim = base / "victim.txt"
    victim.write_bytes(VICTIM_CONTENT)
    yield World(data_root=data_root, outside=outside, victim=victim, marker=base / "pwned")
    for link, _ in links:
        link.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def folders(world: World, tmp_path_factory) -> dict[str, Path]:
    """One folder per case holding the bad spec and the good demo spec."""
    base = tmp_path_factory.mktemp("pipelines")
    result = {}
    for index, case in enumerate(CASES):
        folder = base / case.id
        folder.mkdir()
        (folder / "churn.yaml").write_bytes(DEMO.read_bytes())
        (folder / _file_name(case)).write_bytes(_spec_bytes(case, world, index))
        result[case.id] = folder
    return result


@pytest.fixture(scope="module")
def spec_check(folders: dict[str, Path], world: World) -> dict[str, str]:
    """``airmlops spec check`` on every bad spec (one process): its output per file."""
    env = {**os.environ, **SECRETS, "MLOPS_DATA_ROOT": str(world.data_root)}
    paths = [str(folders[case.id] / _file_name(case)) for case in CASES]
    done = subprocess.run([sys.executable, "-m", "airmlops.cli", "spec", "check", *paths],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    blocks: dict[str, str] = {"__all__": done.stdout + done.stderr}
    for block in done.stderr.split("invalid pipeline spec ")[1:]:
        blocks[Path(block.split(":\n", 1)[0]).name] = block
    for line in done.stdout.splitlines():
        if line.startswith("ok "):
            blocks[Path(line.split()[1]).name] = line
    return blocks


def _assert_no_trace(text: str, world: World) -> None:
    for name, value in SECRETS.items():
        assert value not in text, f"the value of {name} leaked"
    assert OUTSIDE_CANARY not in text, "a file outside the data root was read"
    assert "root:x:0:0" not in text, "/etc/passwd was read"
    assert world.victim.read_bytes() == VICTIM_CONTENT, "the victim file was changed"
    assert not world.marker.exists(), "a command ran"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_spec_check_refuses(case: Case, spec_check: dict[str, str], world: World):
    block = spec_check.get(_file_name(case))
    assert block is not None and not block.startswith("ok "), f"accepted: {block}"
    assert f"\n  {case.field}:" in "\n" + block.split(":\n", 1)[1], block
    _assert_no_trace(spec_check["__all__"], world)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_dag_factory_refuses_only_the_bad_spec(case: Case, folders: dict[str, Path],
                                               world: World, monkeypatch, caplog):
    from airmlops.dags import build_all

    for name, value in SECRETS.items():
        if name.startswith("MLOPS_"):
            monkeypatch.setenv(name, value)
    dags = build_all(folders[case.id])
    placeholder = dags.get(f"evil_{case.id}_invalid_spec")
    assert placeholder is not None, sorted(dags)
    assert f"  {case.field}:" in placeholder.doc_md, placeholder.doc_md
    assert set(dags) >= GOOD_DAGS, "the good pipeline lost DAGs"
    assert not [d for d in dags if d.startswith("evil_") and not d.endswith("_invalid_spec")]
    _assert_no_trace(placeholder.doc_md + caplog.text, world)


def test_there_are_enough_cases():
    assert len(CASES) >= 45


# --- alerts against a capture server -------------------------------------------------------


class _Capture(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        type(self).received.append({"headers": dict(self.headers.items()),
                                    "body": self.rfile.read(length).decode()})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    handler = type("Capture", (_Capture,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        server.server_close()


def _alerting_spec(tmp_path: Path, headers: dict[str, str], url: str) -> Path:
    spec = _demo()
    spec["alerts"] = {"events": ["quarantine"],
                      "webhook": {"url": url, "headers_from_env": headers}}
    path = tmp_path / "alerting.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_alert_carries_only_the_mlops_alert_value(tmp_path, capture, monkeypatch):
    from airmlops.alerts import notify
    from airmlops.spec import load_spec

    url, received = capture
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLOPS_ALERT_HOOK_TOKEN", "Bearer alert-only-value")
    spec = load_spec(_alerting_spec(tmp_path, {"Authorization": "MLOPS_ALERT_HOOK_TOKEN"}, url))
    result = notify(spec, "quarantine", "batch quarantined", {"rows": 3})
    assert result["sent"] == ["webhook"], result
    [request] = received
    assert request["headers"]["Authorization"] == "Bearer alert-only-value"
    seen = json.dumps(request)
    for name, value in SECRETS.items():
        assert value not in seen, f"the value of {name} was sent"


@pytest.mark.parametrize("env_name", ["AIRFLOW__API_AUTH__JWT_SECRET",
                                      "AIRFLOW__CORE__FERNET_KEY",
                                      "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                                      "MLOPS_SERVING_TOKEN"])
def test_a_refused_alert_spec_sends_nothing(tmp_path, capture, monkeypatch, env_name):
    from airmlops.alerts import notify
    from airmlops.spec import PipelineSpec, SpecError, load_spec

    url, received = capture
    monkeypatch.setenv(env_name, SECRETS[env_name])
    path = _alerting_spec(tmp_path, {"Authorization": env_name}, url)
    with pytest.raises(SpecError, match=r"alerts\.webhook\.headers_from_env: .*MLOPS_ALERT_"):
        load_spec(path)
    # Even a spec object that skipped validation cannot read the variable: nothing is sent.
    valid = load_spec(_alerting_spec(tmp_path, {}, url))
    forged_webhook = valid.alerts.webhook.model_construct(
        url=url, headers_from_env={"Authorization": env_name}, timeout_seconds=5.0)
    forged = PipelineSpec.model_construct(**{
        **dict(valid), "alerts": valid.alerts.model_construct(
            events=["quarantine"], smtp=None, webhook=forged_webhook)})
    result = notify(forged, "quarantine", "batch quarantined")
    assert result["sent"] == [] and "MLOPS_ALERT_<NAME>" in result["errors"]["webhook"]
    assert SECRETS[env_name] not in json.dumps(result)
    assert received == []
