"""Every example of the README and the manual (``docs/*.md``), run or checked for real.

The fenced blocks of each page (found by ``docs_examples``; a new page is covered as it lands)
each get a test named ``page:line``:

- YAML parses with ``yaml.safe_load``; a pipeline spec (``name`` and ``source``, or marked
  ``<!-- spec -->``) passes ``load_spec``, and a part of one (marked ``<!-- fragment: ... -->``)
  passes it merged into the demo spec. A block that looks like a part of a spec but is not
  marked fails: it must be checked or say what it is. JSON and CSV parse.
- Shell blocks (bash, sh, console) run with ``bash -euo pipefail`` in a workspace that stands
  for the reader's checkout, after two rewrites: the documented addresses become the test's
  (``127.0.0.1:8600``, the demo's stable address: a served ``churn`` model; ``127.0.0.1:8080``:
  the API server of a platform of this module; the ``deploy.port`` of a spec a page writes:
  that spec's model, trained here on generated rows), and every ``curl`` fails on an HTTP
  error (``--fail-with-body``). The workspace holds the files the pages write (``<!-- file:
  path -->`` blocks), ``.venv`` (this one), and what the docs say the reader has: ``.env`` with
  the platform's webhook secret and the compose admin login, ``.run/airflow/passwords.json``
  with the ``make run`` admin password; ``MLOPS_DATA_ROOT`` and ``MLOPS_PIPELINES_DIR`` point
  into it, and the specs written there get the test's port as their ``deploy.port`` (the same
  address rewrite, for commands that read the address from the spec). Nothing else is
  substituted: an example that needs a value it does not compute itself (``<password>``) fails.
  Examples may call loopback addresses only.
- A shell block runs unless every command of it is on ``NOT_EXECUTABLE`` (each with why); a
  block that mixes both, or a ``curl`` outside a shell block, fails ``test_inventory``.

The platform's default pool has no slot: a run an example queues (a trigger, a webhook) is
created, answered and never executed.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import datetime as dt
import io
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from docs_examples import (
    SHELL_LANGUAGES,
    CodeBlock,
    code_blocks,
    command_heads,
    doc_files,
    shell_script,
)
from model_service_fixtures import Server, stop, wait_ready

from airmlops.platform import free_port, wait_for_dag
from airmlops.settings import PROJECT_ROOT
from airmlops.spec import PipelineSpec, load_spec

pytestmark = pytest.mark.e2e

PAGES = doc_files(PROJECT_ROOT)
BLOCKS = [block for page in PAGES for block in code_blocks(page, PROJECT_ROOT)]
DEMO_SPEC = PROJECT_ROOT / "include" / "pipelines" / "churn.yaml"

NOT_EXECUTABLE = {
    "make": "starts, tests or stops the reader's whole platform (make run/test/stop); the test "
            "runs against services of its own",
    "docker compose": "builds, starts or scales the production stack; tests/compose brings "
                      "it up for real",
    "docker-compose": "the same with Compose v1",
    "scripts/ensure-compose.sh": "builds the compose images (minutes cold); run by "
                                 "tests/compose",
    "cp .env.example .env": "creates the reader's .env (the test writes its own)",
    "cat >> .env": "appends to the reader's .env (the test writes its own)",
}
"""Commands a test does not run, by their first word(s), and why."""

KNOWN_LANGUAGES = {"", "text", "yaml", "json", "csv", "mermaid", *SHELL_LANGUAGES}
"""Block languages with a decision here; another one fails test_inventory until it gets one."""
MARKERS = {"fragment", "spec", "file"}

STABLE_ADDRESS = "127.0.0.1:8600"
"""The demo's stable address in the docs: a served churn model here."""
AIRFLOW_ADDRESS = "127.0.0.1:8080"
"""The Airflow API server (REST API, MLOps view, webhooks) in the docs."""
ADDRESS = re.compile(r"(?:127\.0\.0\.1|localhost):(\d{2,5})")
CURL = re.compile(r"(?<![\w./-])curl(?=\s)")
URL_HOST = re.compile(r"https?://([^/\s'\"\\]+)")
PLACEHOLDER = re.compile(r"<[a-z][\w .-]*>")
"""``<password>``, ``<from the answer>``: a value the reader would have to fill in."""
EXAMPLE_TIMEOUT = 180.0


def _head_reason(head: str) -> str | None:
    for prefix, reason in NOT_EXECUTABLE.items():
        if head == prefix or head.startswith(prefix + " "):
            return reason
    return None


def shell_plan(block: CodeBlock) -> tuple[str, list[str]]:
    """``("run", [])``, ``("listed", reasons)`` or ``("mixed", the listed commands)``."""
    heads = command_heads(shell_script(block))
    listed = [head for head in heads if _head_reason(head) is not None]
    if heads and len(listed) == len(heads):
        return "listed", sorted({_head_reason(head) or "" for head in heads})
    if listed:
        return "mixed", listed
    return "run", []


SHELL_BLOCKS = [b for b in BLOCKS if b.language in SHELL_LANGUAGES]
EXECUTED = [b for b in SHELL_BLOCKS if shell_plan(b)[0] == "run"]
YAML_BLOCKS = [b for b in BLOCKS if b.language == "yaml"]
DATA_BLOCKS = [b for b in BLOCKS if b.language in ("json", "csv")]


def _ids(blocks: list[CodeBlock]) -> list[str]:
    return [b.id for b in blocks]


# --------------------------------------------------------------------------------------------
# The inventory: every block has a decision
# --------------------------------------------------------------------------------------------


def test_inventory():
    """Every page is read, every block's language and markers are known, every curl is in a
    shell block that runs, no block mixes runnable and listed commands, and every entry of
    NOT_EXECUTABLE is still used."""
    assert PAGES[0].name == "README.md" and len(PAGES) >= 3, PAGES
    problems: list[str] = []
    used: set[str] = set()
    for block in BLOCKS:
        if block.language not in KNOWN_LANGUAGES:
            problems.append(f"{block.id}: language {block.language!r} has no decision here "
                            f"(one of {sorted(KNOWN_LANGUAGES)})")
        unknown = set(block.markers) - MARKERS
        if unknown:
            problems.append(f"{block.id}: unknown marker(s) {sorted(unknown)}")
        if CURL.search(block.text) and block.language not in SHELL_LANGUAGES:
            problems.append(f"{block.id}: a curl in a {block.language or 'plain'} block is "
                            "neither run nor listed; make it a bash block")
        if block.language in SHELL_LANGUAGES:
            kind, detail = shell_plan(block)
            if kind == "mixed":
                problems.append(f"{block.id}: mixes commands a test runs with listed ones "
                                f"({detail}); split the block")
            for head in command_heads(shell_script(block)):
                used |= {p for p in NOT_EXECUTABLE if head == p or head.startswith(p + " ")}
    stale = sorted(set(NOT_EXECUTABLE) - used)
    if stale:
        problems.append(f"NOT_EXECUTABLE entries no block uses any more: {stale}")
    counts: dict[str, int] = {}
    for block in BLOCKS:
        if block.language in SHELL_LANGUAGES:
            kind = "shell: run" if shell_plan(block)[0] == "run" else "shell: not run (listed)"
        elif block.language == "yaml":
            kind = "yaml: " + _yaml_kind(block, yaml.safe_load(block.text))
        elif block.language in ("json", "csv"):
            kind = f"{block.language}: parsed"
        else:
            kind = f"{block.language or 'plain'}: text, not checked"
        counts[kind] = counts.get(kind, 0) + 1
    print("\n".join(f"{count:3d}  {kind}" for kind, count in sorted(counts.items())))
    for block in SHELL_BLOCKS:
        kind, detail = shell_plan(block)
        if kind == "listed":
            print(f"not run: {block.id}: {'; '.join(detail)}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# YAML, JSON and CSV
# --------------------------------------------------------------------------------------------


def _yaml_kind(block: CodeBlock, data: Any) -> str:
    if "spec" in block.markers or (isinstance(data, dict) and "name" in data
                                   and "source" in data):
        return "spec"
    if "fragment" in block.markers:
        return "fragment"
    if isinstance(data, dict) and data and set(data) <= set(PipelineSpec.model_fields):
        return "unmarked spec part"
    return "parsed"


def merged(base: Any, part: Any) -> Any:
    """``part`` merged into ``base``: mappings key by key, anything else replaced."""
    if not (isinstance(base, dict) and isinstance(part, dict)):
        return copy.deepcopy(part)
    out = copy.deepcopy(base)
    for key, value in part.items():
        out[key] = merged(out[key], value) if key in out else copy.deepcopy(value)
    return out


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_example(block: CodeBlock, tmp_path: Path):
    data = yaml.safe_load(block.text)
    kind = _yaml_kind(block, data)
    assert kind != "unmarked spec part", (
        f"{block.id} looks like part of a pipeline spec (keys {sorted(data)}): mark it "
        "<!-- fragment: <what> --> to have it checked merged into the demo spec, or "
        "<!-- spec --> if it is a whole one")
    if kind == "parsed":
        return
    path = tmp_path / "spec.yaml"
    if kind == "fragment":
        assert isinstance(data, dict), f"{block.id}: a fragment must be a mapping"
        data = merged(yaml.safe_load(DEMO_SPEC.read_text()), data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(block.text)  # as written: the spec loader's YAML rules apply to it
    # Relative file paths of a spec live under the data root: this test's own.
    load_spec(path, data_roots=[tmp_path / "data"])


@pytest.mark.parametrize("block", DATA_BLOCKS, ids=_ids(DATA_BLOCKS))
def test_data_example(block: CodeBlock):
    if block.language == "json":
        json.loads(block.text)
        return
    rows = list(csv.reader(io.StringIO(block.text)))
    assert len(rows) >= 2, f"{block.id}: a CSV example needs a header and a row"
    widths = {len(row) for row in rows}
    assert widths == {len(rows[0])}, f"{block.id}: rows of {sorted(widths)} cells"


# --------------------------------------------------------------------------------------------
# What the shell examples run against
# --------------------------------------------------------------------------------------------


def doc_specs() -> dict[str, tuple[CodeBlock, dict[str, Any]]]:
    """The specs the pages write into the reader's pipelines folder, by name."""
    found = {}
    for block in BLOCKS:
        target = block.markers.get("file", "")
        if block.language == "yaml" and re.fullmatch(r"include/pipelines/[\w-]+\.ya?ml", target):
            data = yaml.safe_load(block.text)
            found[data["name"]] = (block, data)
    return found


@dataclasses.dataclass
class Live:
    """What the shell examples reach: documented address -> the test's, and the platform."""

    addresses: dict[str, str]
    airflow_url: str
    admin_password: str
    webhook_secret: str


def _platform_pipelines(folder: Path) -> None:
    """The demo spec (deployed nowhere that matters) and every spec a page writes."""
    folder.mkdir(parents=True)
    demo = yaml.safe_load(DEMO_SPEC.read_text())
    demo["deploy"].update(port=free_port(), target="process")
    (folder / "churn.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
    for name, (block, _data) in doc_specs().items():
        (folder / f"{name}.yaml").write_text(block.text)


def _history(spec: PipelineSpec, rows: int, seed: int = 0):
    """``rows`` labelled rows of the last 200 days for ``spec``'s columns, with some signal
    in every feature (bounds, categories and booleans as declared)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    now = dt.datetime.now(dt.UTC)
    ages = rng.uniform(1.0, 200.0, rows)
    frame = pd.DataFrame({
        spec.entity_key: [f"E{i:07d}" for i in range(rows)],
        spec.timestamp: [(now - dt.timedelta(days=float(a))).isoformat() for a in ages],
    })
    score = np.zeros(rows)
    for feature in spec.features:
        if feature.type == "numeric":
            low = feature.min if feature.min is not None else 0.0
            high = feature.max if feature.max is not None else low + 100.0
            values = rng.uniform(low, high, rows)
            score += (values - (low + high) / 2) / max(high - low, 1e-9)
        elif feature.type == "boolean":
            values = rng.random(rows) < 0.5
            score += np.where(values, 0.7, -0.7)
        else:
            categories = feature.values or ["a", "b", "c"]
            picked = rng.integers(0, len(categories), rows)
            values = np.asarray(categories, dtype=object)[picked]
            score += (picked - (len(categories) - 1) / 2) * 0.5
        frame[feature.name] = values
    if spec.task == "regression":
        frame[spec.label] = score * 10 + rng.normal(0, 1, rows)
    else:
        frame[spec.label] = (rng.random(rows) < 1 / (1 + np.exp(-3 * score))).astype(int)
    return frame


def _source_file(spec: PipelineSpec, data_root: Path) -> Path:
    """A file the spec's source path (a path or a glob of file names) matches."""
    pattern = Path(spec.source.path)
    name = pattern.name.replace("*", "history").replace("?", "h")
    return data_root / pattern.parent / name


def _train_doc_model(name: str, block: CodeBlock, root: Path, tracking_uri: str):
    """Train and package the model of a spec a page writes, on generated rows; its bento tag,
    BentoML home and data root."""
    from airmlops import stages
    from airmlops.contracts import Snapshot
    from airmlops.data import snapshots, sources
    from airmlops.serving.bento import build_bento
    from airmlops.settings import Settings

    data_root = root / "data"
    root.mkdir(parents=True)
    spec_path = root / f"{name}.yaml"
    spec_path.write_text(block.text)
    spec = load_spec(spec_path, data_roots=[data_root])
    assert spec.source.kind == "file", f"{block.id}: only file sources are trained here"
    source = _source_file(spec, data_root)
    source.parent.mkdir(parents=True)
    frame = _history(spec, rows=max(2000, spec.training.min_rows * 3))
    if spec.source.format == "parquet" or source.suffix in (".parquet", ".pq"):
        frame.to_parquet(source, index=False)
    else:
        frame.to_csv(source, index=False)
    settings = Settings(data_root=data_root, mlflow_tracking_uri=tracking_uri, redis_url=None)
    run = stages.RunContext(dag_id=spec.training_dag_id, run_id=f"docs-{uuid.uuid4().hex[:8]}",
                            as_of=dt.datetime.now(dt.UTC), git_commit="0" * 40,
                            trigger_reason="docs examples test")
    # The ingest stage, reading this data root (stages.ingest reads the process settings').
    start, end = stages.training_interval(spec, run)
    batch = snapshots.canonicalize(sources.load_batch(spec, start, end, data_root=data_root),
                                   spec)
    written = snapshots.write_snapshot(batch, spec.name, data_root, (start, end))
    snapshot = Snapshot.of(written, spec.spec_hash(), spec_path)  # the spec file is the run's
    trained = stages.train(spec, stages.preprocess(spec, snapshot, settings), run, settings)
    registered = stages.register(spec, trained, settings)
    home = root / "bentoml"
    ref = build_bento(spec, registered.version, tracking_uri, home, spec_path=spec_path)
    return ref.tag, home, data_root


def _serve(tag: str, home: Path, data_root: Path, logs: Path, name: str) -> Server:
    from airmlops.serving.bento import serve_command

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLOPS_SERVING_", "MLOPS_PREDICTION_LOG_"))
           and k != "MLOPS_REDIS_URL"}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true",
               MLOPS_DATA_ROOT=str(data_root))
    log_path = logs / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(serve_command(tag, port), env=env, cwd=logs,
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", process, log_path)


@pytest.fixture(scope="module")
def live(request, platform_factory, mlflow_server: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The platform (webhook secret set, the demo and the pages' specs as pipelines, DAGs
    paused, no pool slot), the churn model behind a stable address, and the model of each
    spec a page writes (with a ``deploy.port``) behind its own. The platform starts while the
    models train."""
    from airflow_api import AirflowClient

    from airmlops.serving import proxy as proxy_mod
    from airmlops.serving.deploy import ensure_proxy, undeploy
    from airmlops.settings import get_settings

    started = time.monotonic()
    root = tmp_path_factory.mktemp("docs-live")
    pipelines, platform_data = root / "pipelines", root / "data"
    _platform_pipelines(pipelines)
    secret = "docs-" + uuid.uuid4().hex
    doc_models = {name: block for name, (block, data) in doc_specs().items()
                  if "port" in data.get("deploy", {})}
    get_settings()  # read once with the session's settings, before the platform's are set
    trained: dict[str, tuple[str, Path, Path]] = {}
    with pytest.MonkeyPatch.context() as env:
        # The platform's processes inherit these (the model work meanwhile reads none).
        env.setenv("MLOPS_GITHUB_WEBHOOK_SECRET", secret)
        env.setenv("MLOPS_PIPELINES_DIR", str(pipelines))
        env.setenv("MLOPS_DATA_ROOT", str(platform_data))
        env.setenv("MLOPS_WEBHOOK_BRANCHES", '["main"]')
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            starting = pool.submit(platform_factory, "docs", PROJECT_ROOT / "dags",
                                   dags_paused_at_creation=True)
            try:
                model = request.getfixturevalue("model")
                request.getfixturevalue("bento")
                for name, block in doc_models.items():
                    trained[name] = _train_doc_model(name, block, root / f"model-{name}",
                                                     mlflow_server)
            finally:
                platform = starting.result()
    print(f"[docs] platform and models ready in {time.monotonic() - started:.0f} s")
    assert "C000010" in model.known, "the README's entity has no online features"
    airflow = AirflowClient.for_platform(platform)
    wait_for_dag(platform.base_url, airflow.token, "churn_training", timeout=240)
    pool_answer = airflow.api("PATCH", "/pools/default_pool", params={"update_mask": "slots"},
                              json={"name": "default_pool", "slots": 0})
    assert pool_answer.status_code == 200, pool_answer.text

    served: list[Server] = []
    deploy_root = root / "deployments"
    addresses = {AIRFLOW_ADDRESS: platform.base_url.removeprefix("http://")}
    try:
        churn = request.getfixturevalue("serve")("docs-churn")
        stables = {"churn": (churn.url, STABLE_ADDRESS)}
        for name, (tag, home, data_root) in trained.items():
            server = _serve(tag, home, data_root, root, name)
            served.append(server)
            wait_ready(server, timeout=180.0)
            port = doc_specs()[name][1]["deploy"]["port"]
            stables[name] = (server.url, f"127.0.0.1:{port}")
        for name, (upstream, documented) in stables.items():
            proxy = ensure_proxy(name, free_port(), deploy_root)
            proxy_mod.switch(proxy.port, proxy.token, upstream, "blue")
            addresses[documented] = f"127.0.0.1:{proxy.port}"
        print(f"[docs] addresses {addresses} after {time.monotonic() - started:.0f} s")
        yield Live(addresses, platform.base_url, platform.password, secret)
    finally:
        for name in ("churn", *trained):
            undeploy(name, deploy_root)
        for server in served:
            stop(server)


# --------------------------------------------------------------------------------------------
# The shell examples
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One stand-in checkout per page (created on first use)."""
    return {}


def _workspace(workspaces: dict[str, Path], page: str, tmp_path_factory) -> Path:
    if page in workspaces:
        return workspaces[page]
    folder = tmp_path_factory.mktemp("docs-" + re.sub(r"\W+", "-", page))
    (folder / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (folder / ".data").mkdir()
    for block in BLOCKS:
        target = block.markers.get("file")
        if block.page == page and target:
            path = Path(target)
            assert not path.is_absolute() and ".." not in path.parts, f"{block.id}: {target}"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(block.text)
    workspaces[page] = folder
    return folder


def _reader_secrets(folder: Path, live: Live) -> None:
    """What the docs say the reader has: .env (webhook secret, compose admin login) and the
    password file of `make run`."""
    (folder / ".env").write_text(
        f"MLOPS_GITHUB_WEBHOOK_SECRET={live.webhook_secret}\n"
        f"_AIRFLOW_WWW_USER_USERNAME=admin\n"
        f"_AIRFLOW_WWW_USER_PASSWORD={live.admin_password}\n")
    passwords = folder / ".run" / "airflow" / "passwords.json"
    passwords.parent.mkdir(parents=True, exist_ok=True)
    passwords.write_text(json.dumps({"admin": live.admin_password}))


def _point_specs_at(folder: Path, page: str, addresses: dict[str, str]) -> None:
    """The page's specs in the workspace, their stable address (``deploy.port``) the test's:
    the same rewrite as in the examples, for the commands that find the address there."""
    for name, (block, data) in doc_specs().items():
        documented = f"127.0.0.1:{data.get('deploy', {}).get('port')}"
        if block.page == page and documented in addresses:
            moved = copy.deepcopy(data)
            moved["deploy"]["port"] = int(addresses[documented].rpartition(":")[2])
            (folder / block.markers["file"]).write_text(yaml.safe_dump(moved, sort_keys=False))
            assert name == moved["name"]


def _needs_services(script: str) -> bool:
    """Whether a script calls a documented address, or a command that reads one from a spec."""
    return bool(ADDRESS.search(script)) or any(
        re.match(r"(\S*/)?airmlops replay\b", head) for head in command_heads(script))


def rewritten(script: str, addresses: dict[str, str]) -> str:
    """The script with the test's addresses and a curl that fails on an HTTP error."""
    for documented, actual in addresses.items():
        script = script.replace(documented, actual)
    return CURL.sub("curl --fail-with-body --max-time 60", script)


@pytest.mark.parametrize("block", EXECUTED, ids=_ids(EXECUTED))
def test_shell_example(block: CodeBlock, request, workspaces, tmp_path_factory):
    script = shell_script(block)
    placeholders = PLACEHOLDER.findall(script)
    assert not placeholders, (f"{block.id} cannot run as written: {placeholders}; compute the "
                              "value in the example (or name the variable that holds it)")
    folder = _workspace(workspaces, block.page, tmp_path_factory)
    addresses: dict[str, str] = {}
    if _needs_services(script):
        live_services: Live = request.getfixturevalue("live")
        _reader_secrets(folder, live_services)
        addresses = live_services.addresses
        _point_specs_at(folder, block.page, addresses)
        unknown = sorted({m.group(0) for m in ADDRESS.finditer(script)} - set(addresses))
        assert not unknown, f"{block.id}: no test service stands behind {unknown}"
    remote = sorted({host for host in URL_HOST.findall(script) if not ADDRESS.fullmatch(host)})
    assert not remote, f"{block.id} would call {remote}: examples run against loopback only"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(folder), "LANG": "C.UTF-8",
           "TMPDIR": str(folder), "MLOPS_DATA_ROOT": str(folder / ".data"),
           "MLOPS_PIPELINES_DIR": str(folder / "include" / "pipelines")}
    text = rewritten(script, addresses)
    started = time.monotonic()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT)
    took = time.monotonic() - started
    shown = f"--- ran ({took:.1f} s):\n{text}\n--- stdout:\n{done.stdout[-4000:]}\n" \
            f"--- stderr:\n{done.stderr[-4000:]}"
    print(shown)
    assert done.returncode == 0, f"{block.id} failed ({done.returncode}):\n{shown}"
    if any(re.match(r"(\S*/)?airmlops replay\b.*--dry-run", h) for h in command_heads(script)):
        # A dry run that reached no service checks only the file: it must reach the test's.
        assert '"live_check": "accepted' in done.stdout, shown


def test_the_platform_ran_nothing_the_examples_queued(request):
    """No run the examples queued (triggers, webhooks) ran a task: they only had to be
    answered."""
    assert any(AIRFLOW_ADDRESS in shell_script(b) for b in EXECUTED), (
        "no executed example calls the API server: the docs lost their trigger and webhook "
        "examples, or the test stopped running them")
    live_services: Live = request.getfixturevalue("live")
    from airmlops.platform import api_token

    token = api_token(live_services.airflow_url, "admin", live_services.admin_password)
    runs = httpx.get(f"{live_services.airflow_url}/api/v2/dags/~/dagRuns",
                     headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert runs.status_code == 200, runs.text
    print(f"{runs.json()['total_entries']} runs queued by the examples")
    answer = httpx.get(f"{live_services.airflow_url}/api/v2/dags/~/dagRuns/~/taskInstances",
                       params={"state": ["running", "success", "failed"]},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["total_entries"] == 0, answer.json()

