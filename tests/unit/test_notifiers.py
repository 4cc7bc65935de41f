"""The failure notifier for real: a DAG of the factory's shape run with `airflow dags test`, whose
failing tasks alert a loopback webhook and, through Airflow's SmtpNotifier and a connection given
as AIRFLOW_CONN_<ID>, a loopback SMTP sink; then the notifier, the connection e-mail and the
throttle on their own.

`airflow dags test` (Airflow 3.3's ``dag.test()``) runs each task in-process and then its
``on_failure_callback``, exactly as a worker does, so the run's alerts are the real ones. It needs
a metadata database: a SQLite file migrated once for this module (about 15 s).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_alerts import HttpSink, SmtpSink, serve_in_thread

from airmlops.alerts import HELD_BACK_KEY, AlertsConfig, AlertThrottle, notify_config
from airmlops.dags.callbacks import PipelineFailureNotifier
from airmlops.notifiers import task_failure

REPO_ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
RELAY_PASSWORD = "relay-pass-5f3a9c"

PROBE_DAG = r'''
"""A DAG of a pipeline built with the factory's shared arguments; some of its tasks fail."""
import datetime as dt
import json
import os
from pathlib import Path

import yaml
from airflow.sdk import DAG, BaseHook, task
from airflow.sdk.exceptions import AirflowFailException

from airmlops.dags.common import pipeline_dag_args
from airmlops.spec import parse_spec

data = yaml.safe_load(Path(os.environ["PROBE_SPEC"]).read_text())
data["alerts"] = json.loads(os.environ["PROBE_ALERTS"])
spec = parse_spec(data)

with DAG("churn_alerting_probe", schedule=None, doc_md=__doc__,
         **pipeline_dag_args(spec, "probe")):

    @task
    def fine() -> int:
        return 1

    @task
    def deploy(value: int) -> None:
        raise AirflowFailException("deploy failed, old version still serving:\nno healthy slot")

    @task
    def after() -> None:
        pass

    @task(retries=1, retry_delay=dt.timedelta(0), retry_exponential_backoff=False)
    def flaky() -> None:
        password = BaseHook.get_connection("smtp_alerts").password
        raise ValueError(f"relay refused {password} {{{{ 7 * 7 }}}}")

    deploy(fine()) >> after()
    flaky()
'''


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    yield from serve_in_thread(SmtpSink())


@pytest.fixture
def http_sink() -> Iterator[HttpSink]:
    yield from serve_in_thread(HttpSink())


def smtp_connection(sink: SmtpSink, **extra: Any) -> str:
    """An Airflow SMTP connection to the sink, as AIRFLOW_CONN_<ID> takes it (JSON)."""
    return json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": sink.port, "login": "relay-user",
        "password": RELAY_PASSWORD,
        "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 5,
                  "from_email": "airflow@example.com", **extra}})


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """A migrated SQLite Airflow home whose DAGs folder holds only the probe DAG."""
    home = tmp_path_factory.mktemp("airflow-alerts")
    (home / "dags").mkdir()
    (home / "dags" / "alerting_probe.py").write_text(PROBE_DAG)
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
           "MLOPS_DATA_ROOT": str(home / "data"),
           "PROBE_SPEC": str(REPO_ROOT / "include" / "pipelines" / "churn.yaml")}
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=300)
    return env


def test_a_real_dag_run_alerts_once_per_task_failed_for_good(airflow_env, http_sink,
                                                              smtp_sink):
    alerts = {"webhook": {"url": http_sink.url},
              "smtp": {"conn_id": "smtp_alerts", "to": ["oncall@example.com"]}}
    env = {**airflow_env, "PROBE_ALERTS": json.dumps(alerts),
           "AIRFLOW_CONN_SMTP_ALERTS": smtp_connection(smtp_sink)}
    run = subprocess.run([AIRFLOW, "dags", "test", "churn_alerting_probe",
                          "2026-07-01T00:00:00+00:00"],
                         env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert "Task failed with exception" in output, output[-4000:]

    # deploy failed at once (AirflowFailException), flaky after its retry; fine succeeded and
    # after never ran (upstream failed): one alert each for deploy and flaky, none for the retry.
    payloads = {request["body"]["details"]["task_id"]: request["body"]
                for request in http_sink.requests}
    assert len(http_sink.requests) == 2, output[-4000:]
    assert set(payloads) == {"deploy", "flaky"}
    deploy = payloads["deploy"]
    assert deploy["source"] == "airmlops" and deploy["pipeline"] == "churn"
    assert deploy["event"] == "task_failed"
    assert deploy["message"] == ("task deploy of churn_alerting_probe failed for good (try 1): "
                                 "AirflowFailException: deploy failed, old version still "
                                 "serving: no healthy slot")
    details = deploy["details"]
    assert details["dag_id"] == "churn_alerting_probe" and details["try_number"] == 1
    assert details["run_id"].startswith("manual__")
    assert details["logical_date"] == "2026-07-01T00:00:00+00:00"
    assert details["error_type"] == "AirflowFailException"
    assert details["error"] == "deploy failed, old version still serving: no healthy slot"
    assert details["log_url"].endswith("/tasks/deploy?try_number=1")
    assert "/dags/churn_alerting_probe/runs/" in details["log_url"]

    flaky = payloads["flaky"]["details"]
    assert flaky["try_number"] == 2 and flaky["max_tries"] == 1
    assert flaky["error_type"] == "ValueError"
    # The password the task read from its connection is masked; the text is never rendered.
    assert flaky["error"] == "relay refused *** {{ 7 * 7 }}"
    assert RELAY_PASSWORD not in json.dumps(http_sink.requests)

    # The same two alerts by e-mail, sent by Airflow's SmtpNotifier with the connection.
    assert len(smtp_sink.messages) == 2
    subjects = sorted(" ".join(mail["message"]["Subject"].split())  # unfolded
                      for mail in smtp_sink.messages)
    assert subjects == [
        "[airmlops] churn: task_failed: task deploy of churn_alerting_probe failed for good "
        "(try 1): AirflowFailException: deploy failed, old version still serving: no healthy "
        "slot",
        "[airmlops] churn: task_failed: task flaky of churn_alerting_probe failed for good "
        "(try 2): ValueError: relay refused *** {{ 7 * 7 }}"]
    for mail in smtp_sink.messages:
        assert mail["auth"] == ("relay-user", RELAY_PASSWORD)
        assert mail["from"] == "<airflow@example.com>"
        assert mail["rcpt"] == ["<oncall@example.com>"]
        body = mail["message"].get_body(preferencelist=("html",)).get_content()
        assert RELAY_PASSWORD not in body and "Event: task_failed" in body


def failure_context(error: BaseException | str | None, **ti_fields: Any) -> dict[str, Any]:
    """A failure callback's context as Airflow's task runner builds it, from real SDK objects:
    a DAG, its operator and the RuntimeTaskInstance that ran it."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    logical_date = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
    with DAG("churn_training", schedule=None, start_date=logical_date) as dag:
        operator = EmptyOperator(task_id="containerize")
    fields = {"id": uuid.uuid4(), "task_id": "containerize", "dag_id": "churn_training",
              "run_id": "scheduled__2026-07-01T00:00:00+00:00", "try_number": 3,
              "map_index": -1, "max_tries": 2, "task": operator, **ti_fields}
    ti = RuntimeTaskInstance.model_construct(**fields)
    return {"dag": dag, "task": operator, "ti": ti, "task_instance": ti,
            "run_id": ti.run_id, "logical_date": logical_date, "exception": error}


def test_the_alert_names_the_task_the_try_and_the_error_on_one_line():
    error = RuntimeError("docker build failed:\n  step 3/7\n" + "x" * 2000)
    message, details = task_failure(failure_context(error))
    assert message.startswith("task containerize of churn_training failed for good (try 3): "
                              "RuntimeError: docker build failed: step 3/7 xxx")
    assert details["error"] == ("docker build failed: step 3/7 " + "x" * 2000)[:500]
    assert "\n" not in message
    assert details["log_url"].endswith(
        "/dags/churn_training/runs/scheduled__2026-07-01T00%3A00%3A00%2B00%3A00/tasks/"
        "containerize?try_number=3")
    assert {key: details[key] for key in ("dag_id", "task_id", "run_id", "try_number",
                                          "max_tries", "logical_date", "error_type")} == {
        "dag_id": "churn_training", "task_id": "containerize",
        "run_id": "scheduled__2026-07-01T00:00:00+00:00", "try_number": 3, "max_tries": 2,
        "logical_date": "2026-07-01T00:00:00+00:00", "error_type": "RuntimeError"}
    assert "map_index" not in details
    _, mapped = task_failure(failure_context(error, map_index=4))
    assert mapped["map_index"] == 4 and "/mapped/4?" in mapped["log_url"]


def test_a_task_that_died_without_an_exception_still_alerts(http_sink):
    """The DAG processor runs the callback of a task that died unreported, with a message."""
    notifier = PipelineFailureNotifier("churn", AlertsConfig(webhook={"url": http_sink.url}))
    notifier(failure_context("Task was killed: heartbeat timeout"))
    notifier(failure_context(None))
    first, second = (request["body"]["details"] for request in http_sink.requests)
    assert first["error_type"] is None and first["error"] == "Task was killed: heartbeat timeout"
    assert second["error"] is None
    assert http_sink.requests[1]["body"]["message"].endswith("(try 3): no error reported")


def test_secrets_in_the_error_are_masked(http_sink, monkeypatch):
    from airflow.sdk.log import mask_secret

    from airmlops.settings import get_settings

    monkeypatch.setenv("MLOPS_SERVING_TOKEN", "serving-token-8d1e77")
    get_settings.cache_clear()
    try:
        mask_secret("variable-secret-42c9b1")
        notifier = PipelineFailureNotifier("churn", AlertsConfig(webhook={"url": http_sink.url}))
        notifier(failure_context(PermissionError(
            "401 for Bearer serving-token-8d1e77 with variable-secret-42c9b1")))
    finally:
        get_settings.cache_clear()
    [request] = http_sink.requests
    sent = json.dumps(request)
    assert "serving-token-8d1e77" not in sent and "variable-secret-42c9b1" not in sent
    assert request["body"]["details"]["error"] == "401 for Bearer *** with ***"


def test_a_failing_channel_or_a_broken_notifier_never_raises(http_sink, caplog):
    http_sink.status = 500
    config = AlertsConfig.model_validate({
        "webhook": {"url": http_sink.url},
        "smtp": {"host": "127.0.0.1", "port": 1, "from": "a@example.com",
                 "to": ["b@example.com"]}})
    context = failure_context(ValueError("boom"))
    with caplog.at_level(logging.WARNING):
        assert PipelineFailureNotifier("churn", config)(context) is None
    assert len(http_sink.requests) == 1
    assert "could not be sent by smtp" in caplog.text
    assert "could not be sent by webhook" in caplog.text

    caplog.clear()
    broken = PipelineFailureNotifier("churn", "not a config")  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        assert broken(context) is None
        assert broken.notify(context) is None
    assert "failure alert of churn could not be sent" in caplog.text
    assert PipelineFailureNotifier("churn", config)({}) is None


def test_without_alerts_the_notifier_sends_nothing(http_sink, caplog):
    with caplog.at_level(logging.INFO):
        PipelineFailureNotifier("churn", None)(failure_context(ValueError("x")))
    assert "not sent: no alerts configured" in caplog.text
    only_domain = AlertsConfig(events=["rollback"], webhook={"url": http_sink.url})
    PipelineFailureNotifier("churn", only_domain)(failure_context(ValueError("x")))
    assert http_sink.requests == []


def test_the_notifier_pickles_small_and_holds_no_spec(http_sink):
    config = AlertsConfig(webhook={"url": http_sink.url})
    notifier = PipelineFailureNotifier("churn", config)
    notifier(failure_context(ValueError("x")))  # caches a logger, which must not be pickled
    data = pickle.dumps(notifier)
    assert len(data) < 2000
    back = pickle.loads(data)
    assert (back.pipeline, back.config) == ("churn", config)
    assert repr(back) == "PipelineFailureNotifier(pipeline='churn', channels=['webhook'])"
    assert PipelineFailureNotifier.template_fields == ()


def test_a_domain_alert_goes_through_the_airflow_connection(smtp_sink, monkeypatch):
    """Outside any task (as the serving supervisor sends), the same notify_config path."""
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS_DIRECT", smtp_connection(smtp_sink))
    config = AlertsConfig.model_validate(
        {"smtp": {"conn_id": "smtp_alerts_direct", "to": ["ml-team@example.com"]}})
    result = notify_config("churn", config, "slot_died", "slot <blue> died {{ 1 + 1 }}",
                           {"slot": "blue", "exit_code": -9})
    assert result == {"event": "slot_died", "sent": ["smtp"], "errors": {}, "skipped": None}
    [mail] = smtp_sink.messages
    assert mail["auth"] == ("relay-user", RELAY_PASSWORD)
    assert mail["from"] == "<airflow@example.com>"  # the connection's from_email
    message = mail["message"]
    assert message["Subject"] == "[airmlops] churn: slot_died: slot <blue> died {{ 1 + 1 }}"
    body = message.get_body(preferencelist=("html",)).get_content()
    assert body.startswith("<pre>") and "slot &lt;blue&gt; died {{ 1 + 1 }}" in body
    assert "&quot;exit_code&quot;: -9" in body and RELAY_PASSWORD not in body

    spec_sender = AlertsConfig.model_validate(
        {"smtp": {"conn_id": "smtp_alerts_direct", "from": "mlops@example.com",
                  "to": ["ml-team@example.com"]}})
    assert notify_config("churn", spec_sender, "failover", "x")["sent"] == ["smtp"]
    assert smtp_sink.messages[1]["from"] == "<mlops@example.com>"


def test_a_connection_that_is_missing_not_smtp_or_down_is_reported(smtp_sink, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOT_MAIL",
                       f"postgres://db-user:db-pass-77@127.0.0.1:{smtp_sink.port}/airflow")
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DOWN", json.dumps(
        {"conn_type": "smtp", "host": "127.0.0.1", "port": 1,
         "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 5,
                   "from_email": "airflow@example.com"}}))
    outcomes = {}
    for conn_id in ("not_mail", "smtp_down", "smtp_nowhere"):
        config = AlertsConfig.model_validate({"smtp": {"conn_id": conn_id,
                                                       "to": ["a@example.com"]}})
        result = notify_config("churn", config, "proxy_died", "x")
        assert result["sent"] == [] and result["skipped"] is None
        outcomes[conn_id] = result["errors"]["smtp"]
    assert "'not_mail' is of type 'postgres', not smtp" in outcomes["not_mail"]
    assert "db-pass-77" not in json.dumps(outcomes)
    assert "Connection refused" in outcomes["smtp_down"] or "Errno" in outcomes["smtp_down"]
    assert "smtp_nowhere" in outcomes["smtp_nowhere"]
    assert smtp_sink.messages == []


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_sends_one_alert_a_while_and_counts_the_rest(http_sink):
    clock = Clock()
    throttle = AlertThrottle(60, clock=clock)
    config = AlertsConfig(webhook={"url": http_sink.url})
    first = throttle.notify_config("churn", config, "slot_died", "blue died", {"slot": "blue"})
    assert first["sent"] == ["webhook"]
    for _ in range(3):
        clock.now += 10
        held = throttle.notify_config("churn", config, "slot_died", "blue died again")
        assert held["sent"] == [] and held["skipped"].startswith("throttled: at most one "
                                                                 "slot_died alert of churn")
    assert throttle.held_back("churn", "slot_died") == 3
    # Other events and other pipelines have their own allowance.
    assert throttle.notify_config("churn", config, "proxy_died", "proxy died")["sent"]
    assert throttle.notify_config("fraud", config, "slot_died", "green died")["sent"]
    clock.now += 31  # 61 s after the first
    after = throttle.notify_config("churn", config, "slot_died", "blue died", {"slot": "blue"})
    assert after["sent"] == ["webhook"]
    assert http_sink.requests[-1]["body"]["details"] == {"slot": "blue", HELD_BACK_KEY: 3}
    assert throttle.held_back("churn", "slot_died") == 0
    assert HELD_BACK_KEY not in http_sink.requests[0]["body"]["details"]
    assert len(http_sink.requests) == 4


def test_the_throttle_does_not_count_what_nobody_receives(http_sink):
    throttle = AlertThrottle(60, clock=Clock())
    config = AlertsConfig(events=["slot_died"], webhook={"url": http_sink.url})
    for _ in range(3):
        skipped = throttle.notify_config("churn", config, "failover", "x")
        assert skipped["skipped"] == "event failover not subscribed"
        assert throttle.notify_config("churn", None, "failover", "x")["skipped"] == (
            "no alerts configured")
    assert throttle.held_back("churn", "failover") == 0
    assert throttle.admit("churn", "failover") == 0
    with pytest.raises(ValueError, match="unknown alert event"):
        throttle.notify_config("churn", config, "deployed", "x")
    with pytest.raises(ValueError, match="interval_seconds"):
        AlertThrottle(-1)


def test_the_throttle_admits_one_of_many_threads():
    throttle = AlertThrottle(60)
    admitted: list[int | None] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        admitted.append(throttle.admit("churn", "slot_died"))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(admitted, key=lambda value: value is not None) == [None] * 7 + [0]
    assert throttle.held_back("churn", "slot_died") == 7
