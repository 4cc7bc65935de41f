"""Attacks on the model service and its stable address, both running for real.

The model service is ``bentoml serve`` of a bento built from a registered model (the recipe of
tests/model_service_fixtures.py) with ``MLOPS_SERVING_TOKEN`` set; the stable address is the
project's proxy process (:func:`airmlops.serving.deploy.ensure_proxy`) switched to it. Each case
asserts the refusal (status, error kind and message) and that it had no effect: the service
answered no prediction and accepted no label (its Prometheus counters of 200 and 202 answers
are unchanged, and at the end the prediction log holds only the control request), the proxy's
routing is unchanged, and a loopback capture server standing where a refused upstream would
resolve received no connection. Oversized headers and slow clients are test_http_limits.py's,
label semantics test_feedback.py's.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from model_service_fixtures import WINDOW, metric

from airmlops.platform import free_port
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy import ProxyHandle, ensure_proxy, undeploy
from airmlops.serving.prediction_log import read_predictions

pytestmark = pytest.mark.integration

TOKEN = "svc-" + uuid.uuid4().hex
MAX_INSTANCES = 50
PICKLE = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R."
"""``pickle.dumps`` of a reduce to ``os.system("id")``: refused unread by its content type."""


@dataclasses.dataclass(frozen=True)
class Served:
    """The secured model service, the proxy in front of it, and what was answered so far."""

    url: str
    proxy: ProxyHandle
    known: str
    log_path: Path

    def answered(self) -> float:
        """How many /predict 200s and /feedback 202s the service has given (its /metrics)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text
        return (metric(text, "airmlops_requests_total", endpoint="/predict", status="200")
                + metric(text, "airmlops_requests_total", endpoint="/feedback", status="202"))


@pytest.fixture(scope="module")
def served(serve, model, tmp_path_factory) -> Iterator[Served]:
    service = serve("live-attacks", MLOPS_SERVING_TOKEN=TOKEN,
                    MLOPS_SERVING_MAX_INSTANCES=str(MAX_INSTANCES))
    root = tmp_path_factory.mktemp("attack-deploy")
    proxy = ensure_proxy("attack_probe", free_port(), root)
    try:
        proxy_mod.switch(proxy.port, proxy.token, service.url, "blue")
        yield Served(service.url, proxy, model.known[0], service.log_path)
    finally:
        undeploy("attack_probe", root)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def instance(entity: Any, tenure: Any = 120.0) -> dict[str, Any]:
    return {"customer_id": entity, "tenure_days": tenure}


def test_control_a_valid_request_is_answered_through_both_addresses(served):
    """The positive control: the counters below would move if an attack were answered."""
    body = {"instances": [instance(served.known)]}
    for base in (served.url, served.proxy.url):
        answer = httpx.post(f"{base}/predict", json=body, headers=auth(), trust_env=False)
        assert answer.status_code == 200, answer.text
    assert served.answered() == 2


# --------------------------------------------------------------------------------------------
# Bearer token
# --------------------------------------------------------------------------------------------

BAD_CREDENTIALS: dict[str, tuple[dict[str, str], dict[str, str], str]] = {
    "truncated token": (auth(TOKEN[:-1]), {}, "invalid bearer token"),
    "token with a suffix": (auth(TOKEN + "0"), {}, "invalid bearer token"),
    "empty bearer": ({"Authorization": "Bearer"}, {}, "bearer token"),
    "token in the query string": ({}, {"token": TOKEN, "access_token": TOKEN},
                                  "missing bearer token"),
    "token in a cookie": ({"Cookie": f"token={TOKEN}; _token={TOKEN}"}, {},
                          "missing bearer token"),
    "token in X-Api-Key": ({"X-Api-Key": TOKEN}, {}, "missing bearer token"),
}


@pytest.mark.parametrize("endpoint", ["/predict", "/feedback"])
@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
def test_requests_without_the_bearer_token_are_refused(served, case, endpoint):
    headers, params, words = BAD_CREDENTIALS[case]
    body = ({"instances": [instance(served.known)]} if endpoint == "/predict"
            else {"request_id": "b" * 32, "labels": [{"entity": served.known, "label": 1}]})
    before = served.answered()
    answer = httpx.post(f"{served.url}{endpoint}", json=body, headers=headers, params=params,
                        trust_env=False)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == "unauthorized"
    assert words in answer.json()["message"]
    assert served.answered() == before


def test_the_proxy_admin_token_is_not_a_service_token(served):
    before = served.answered()
    answer = httpx.post(f"{served.proxy.url}/predict", json={"instances": [instance(served.known)]},
                        headers=auth(served.proxy.token), trust_env=False)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == "unauthorized"
    assert served.answered() == before


# --------------------------------------------------------------------------------------------
# Request bodies (authenticated: the checks behind the token)
# --------------------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"instances": [' + b"[" * depth + b"]" * depth + b"]}"


BAD_BODIES: dict[str, tuple[str | None, bytes, int, str, str]] = {
    "pickle (application/pickle)": ("application/pickle", PICKLE, 415, "unsupported_media_type",
                                    "pickled payloads are never deserialized"),
    "pickle (x-python-pickle)": ("application/x-python-pickle", PICKLE, 415,
                                 "unsupported_media_type", "pickled payloads are never"),
    "pickle with parameters": ("application/x-pickle; protocol=4", PICKLE, 415,
                               "unsupported_media_type", "pickled payloads are never"),
    "pickle as octet-stream": ("application/octet-stream", PICKLE, 415,
                               "unsupported_media_type", "send application/json"),
    "text/plain": ("text/plain", b'{"instances": []}', 415, "unsupported_media_type",
                   "send application/json"),
    "multipart form": ("multipart/form-data; boundary=x",
                       b'--x\r\nContent-Disposition: form-data; name="f"\r\n\r\n1\r\n--x--\r\n',
                       415, "unsupported_media_type", "send application/json"),
    "trailing garbage after JSON": ("application/json", b'{"instances": []} trailing', 400,
                                    "invalid_json", "the body is not valid JSON"),
    "single-quoted JSON": ("application/json", b"{'instances': []}", 400, "invalid_json",
                           "the body is not valid JSON"),
    "invalid UTF-8": ("application/json", b'{"instances": [{"customer_id": "\xff\xfe"}]}', 400,
                      "invalid_json", "not valid JSON"),
    "deeply nested JSON": ("application/json", _nested(100_000), 400, "invalid_json",
                           "not valid JSON"),
    "Infinity": ("application/json",
                 b'{"instances": [{"customer_id": "C000001", "tenure_days": Infinity}]}', 422,
                 "invalid_request", "tenure_days: Input should be a finite number"),
    "-Infinity": ("application/json",
                  b'{"instances": [{"customer_id": "C000001", "tenure_days": -Infinity}]}', 422,
                  "invalid_request", "tenure_days: Input should be a finite number"),
    "1e999 overflowing to infinity": (
        "application/json", b'{"instances": [{"customer_id": "C000001", "tenure_days": 1e999}]}',
        422, "invalid_request", "tenure_days: Input should be a finite number"),
    "NaN as text": ("application/json",
                    b'{"instances": [{"customer_id": "C000001", "tenure_days": "NaN"}]}', 422,
                    "invalid_request", "tenure_days: Input should be a valid number"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_malicious_bodies_get_a_4xx_naming_the_problem(served, case):
    media_type, content, status, kind, words = BAD_BODIES[case]
    before = served.answered()
    headers = {**auth(), **({"Content-Type": media_type} if media_type else {})}
    answer = httpx.post(f"{served.url}/predict", content=content, headers=headers,
                        trust_env=False, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == kind
    assert words in answer.json()["message"]
    assert served.answered() == before


BAD_INSTANCES: dict[str, tuple[Any, str]] = {
    "1000 instances (max 50)": ({"instances": [instance("C000001")] * 1000},
                                f"instances: the list should have at most {MAX_INSTANCES} items"),
    "feature as a huge array": ({"instances": [instance("C000001", [0] * 10_000)]},
                                "tenure_days: Input should be a valid number"),
    "feature as an object": ({"instances": [instance("C000001", {"$gt": 0})]},
                             "tenure_days: Input should be a valid number"),
    "feature as null": ({"instances": [instance("C000001", None)]},
                        "tenure_days: Input should be a valid number"),
    "entity as a float": ({"instances": [instance(1.5)]},
                          "customer_id: must be a string or an integer"),
    "entity as a boolean": ({"instances": [instance(True)]},
                            "customer_id: must be a string or an integer"),
    "dunder field": ({"instances": [{**instance("C000001"), "__class__": "os.system"}]},
                     "instances[0].__class__: is not a known field"),
    "spec field not sent by clients": ({"instances": [{**instance("C000001"), "sessions": 3}]},
                                       "instances[0].sessions: is not a known field"),
}


@pytest.mark.parametrize("case", list(BAD_INSTANCES))
def test_instances_that_break_the_schema_get_422(served, case):
    body, words = BAD_INSTANCES[case]
    before = served.answered()
    answer = httpx.post(f"{served.url}/predict", json=body, headers=auth(), trust_env=False)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert words in answer.json()["message"]
    assert served.answered() == before


@pytest.mark.parametrize("entity", ["../../../../etc/passwd", "' OR '1'='1' --",
                                    "C000001\x00", "*"],
                         ids=["path", "sql injection", "NUL suffix", "wildcard"])
def test_injection_strings_as_entity_ids_are_unknown_entities(served, entity):
    """Entity ids are looked up as data (parameterised queries, exact keys): never found."""
    before = served.answered()
    answer = httpx.post(f"{served.url}/predict", json={"instances": [instance(entity)]},
                        headers=auth(), trust_env=False)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "unknown_entity"
    assert "root:" not in answer.text
    assert served.answered() == before


@pytest.mark.parametrize("request_id", ["../../x", "b" * 31 + "\n", "' OR 1=1 --", ""],
                         ids=["path", "newline", "sql injection", "empty"])
def test_feedback_with_an_injected_request_id_is_refused(served, request_id):
    before = served.answered()
    answer = httpx.post(f"{served.url}/feedback", headers=auth(), trust_env=False,
                        json={"request_id": request_id,
                              "labels": [{"entity": served.known, "label": 1}]})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert "request_id" in answer.json()["message"]
    assert served.answered() == before


# --------------------------------------------------------------------------------------------
# URL paths
# --------------------------------------------------------------------------------------------


def raw_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """``method path`` sent byte for byte; the status and the JSON answer ({} if not JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, {"raw": raw.decode(errors="replace")}


SERVICE_PATHS = {
    "dot-dot before predict": "/../../predict",
    "dot-dot to a file": "/predict/../../../../etc/passwd",
    "encoded dot-dot": "/%2e%2e/%2e%2e/etc/passwd",
    "encoded slash": "/predict%2F..%2F..%2Fetc%2Fpasswd",
    "static files outside": "/static/..%2f..%2f..%2fetc/passwd",
}


@pytest.mark.parametrize("path", list(SERVICE_PATHS.values()), ids=list(SERVICE_PATHS))
def test_path_traversal_on_the_model_service_serves_nothing(served, path):
    port = int(served.url.rsplit(":", 1)[1])
    before = served.answered()
    status, answer = raw_request(port, "GET", path, headers=auth())
    assert status in (400, 404), answer
    assert "root:" not in json.dumps(answer)
    assert served.answered() == before


PROXY_PATHS = {
    "admin reached through dot-dot": ("POST", "/predict/../__proxy/switch"),
    "admin reached with encoded dots": ("POST", "/predict/%2e%2e/__proxy/switch"),
    "encoded admin prefix": ("POST", "/%5F%5Fproxy/switch"),
    "double slash admin prefix": ("POST", "//__proxy/switch"),
    "dot-dot out of the admin prefix": ("GET", "/__proxy/../predict"),
    "file outside through the proxy": ("GET", "/../../../../etc/passwd"),
}


@pytest.mark.parametrize("method,path", list(PROXY_PATHS.values()), ids=list(PROXY_PATHS))
def test_path_tricks_on_the_stable_address_never_switch_it(served, method, path):
    """Without the admin token no path spelling reaches the switch, and nothing is served."""
    state = proxy_mod.get_state(served.proxy.port)
    body = json.dumps({"upstream": "http://127.0.0.1:1", "slot": "green",
                       "verify": False}).encode()
    status, answer = raw_request(served.proxy.port, method, path, body=body,
                                 headers={**auth(), "Content-Type": "application/json"})
    assert status in (401, 404), answer
    assert "root:" not in json.dumps(answer)
    after = proxy_mod.get_state(served.proxy.port)
    assert (after["upstream"], after["generation"]) == (state["upstream"], state["generation"])


# --------------------------------------------------------------------------------------------
# The proxy's admin endpoint
# --------------------------------------------------------------------------------------------


class CaptureServer:
    """A loopback TCP listener that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    yield server
    server.close()


def _switch(served: Served, body: Any, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{served.proxy.url}/__proxy/switch", json=body, headers=headers,
                      trust_env=False, timeout=30)


ADMIN_CREDENTIALS: dict[str, Callable[[str], dict[str, str]]] = {
    "no token": lambda admin: {},
    "the model service token": lambda admin: auth(TOKEN),
    "truncated admin token": lambda admin: auth(admin[:-1]),
    "admin token as Basic": lambda admin: {"Authorization": f"Basic {admin}"},
    "admin token in X-Admin-Token": lambda admin: {"X-Admin-Token": admin},
}


@pytest.mark.parametrize("case", list(ADMIN_CREDENTIALS))
def test_switch_without_the_admin_token_is_refused(served, capture, case):
    headers = ADMIN_CREDENTIALS[case](served.proxy.token)
    state = proxy_mod.get_state(served.proxy.port)
    answer = _switch(served, {"upstream": f"http://127.0.0.1:{capture.port}", "slot": "green"},
                     headers)
    assert answer.status_code == 401, answer.text
    assert answer.json() == {"error": "unauthorized",
                             "message": "a valid admin bearer token is required"}
    assert proxy_mod.get_state(served.proxy.port)["generation"] == state["generation"]
    assert capture.accepted == 0


LOOPBACK_ALIASES = {
    "all interfaces 0.0.0.0": "0.0.0.0",
    "short form 127.1": "127.1",
    "decimal 2130706433": "2130706433",
    "hex 0x7f000001": "0x7f000001",
    "trailing-dot localhost.": "localhost.",
    "IPv6 unspecified [::]": "[::]",
}


@pytest.mark.parametrize("verify", [True, False], ids=["with readiness check", "verify false"])
@pytest.mark.parametrize("host", list(LOOPBACK_ALIASES.values()), ids=list(LOOPBACK_ALIASES))
def test_switch_to_an_address_that_is_not_plain_loopback_never_connects(served, capture, host,
                                                                         verify):
    """Spellings that a resolver would send to this machine are refused by the validator: the
    capture server listening where they lead sees no connection."""
    state = proxy_mod.get_state(served.proxy.port)
    answer = _switch(served, {"upstream": f"http://{host}:{capture.port}", "slot": "green",
                              "verify": verify}, auth(served.proxy.token))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_request"
    assert "invalid switch request" in answer.json()["message"]
    assert capture.accepted == 0
    assert proxy_mod.get_state(served.proxy.port)["generation"] == state["generation"]


REMOTE_UPSTREAMS = {
    "private 10.0.0.1": "http://10.0.0.1:3000",
    "private 192.168.1.1": "http://192.168.1.1:3000",
    "cloud metadata 169.254.169.254": "http://169.254.169.254:80",
    "hostname": "http://model.internal.example:3000",
    "credentials hiding a remote host": "http://127.0.0.1:3000@10.0.0.1:3000",
    "IPv4-mapped IPv6 of 10.0.0.1": "http://[::ffff:10.0.0.1]:3000",
}


@pytest.mark.parametrize("url", list(REMOTE_UPSTREAMS.values()), ids=list(REMOTE_UPSTREAMS))
def test_switch_to_a_remote_upstream_is_refused_before_any_connection(served, url):
    """Refused by validation, before the readiness probe: a probe that had tried to connect
    would answer 409 "not reachable", not 400; with ``verify`` off nothing else connects."""
    state = proxy_mod.get_state(served.proxy.port)
    for verify in (False, True):
        answer = _switch(served, {"upstream": url, "slot": "green", "verify": verify},
                         auth(served.proxy.token))
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "bad_request"
        assert "invalid" in answer.json()["message"] or "loopback" in answer.json()["message"]
        assert "not reachable" not in answer.json()["message"]
    after = proxy_mod.get_state(served.proxy.port)
    assert (after["upstream"], after["generation"]) == (state["upstream"], state["generation"])
    assert after["upstream_errors"] == state["upstream_errors"]


def test_no_refused_request_reached_the_prediction_log_or_logged_the_token(served, model):
    """After every attack above: the log holds only the two control predictions, and neither
    the token nor a pickle payload shows up in the service's output."""
    deadline = time.monotonic() + 30
    while True:
        logged = read_predictions("churn", *WINDOW, settings=model.settings)
        if len(logged) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(logged) == 2, logged[["request_id", "entity_id"]]
    assert set(logged["entity_id"]) == {served.known}
    output = served.log_path.read_text(errors="replace")
    assert TOKEN not in output
    assert "os.system" not in output
