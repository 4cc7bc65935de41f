"""The shadow admin action of the stable address (``POST /__proxy/shadow``) and the shadow mark
of a request (``X-Airmlops-Shadow-Of``) refuse what they must.

- The admin action: no token or a wrong one (401); a body that is not a shadow, naming the
  field (400); a slot that is not registered, is the active slot or is the canary's (409); a
  canary on the shadow's slot (409). What it accepts is persisted, and clearing it is too.
- The mark: anything but the live answer's request id (32 lowercase hex digits) is a 400
  ``invalid_header`` naming the header, and so is a request marked both shadow and synthetic,
  by the request gate and on BentoML's own lane alike.

The parsers are called directly; the live action runs against a real proxy started as a deploy
starts it (``ensure_proxy``), the marks against the real model service.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from airmlops.serving import deploy as deploy_mod
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy import ensure_proxy, undeploy
from airmlops.serving.gate import traffic_marks
from airmlops.serving.proxy.admin import parse_shadow
from airmlops.serving.proxy.asgi import ClientError
from airmlops.serving.proxy.table import CanarySpec, RoutingTable, ShadowSpec, SlotSpec
from airmlops.serving.shadow_header import SHADOW_HEADER
from airmlops.serving.synthetic import SYNTHETIC_HEADER


def three_slots() -> RoutingTable:
    """Slot blue active, green registered, gray registered and the canary."""
    slots = {name: SlotSpec(version, (f"http://127.0.0.1:900{version}",))
             for name, version in (("blue", "1"), ("green", "2"), ("gray", "3"))}
    return RoutingTable(slots, "blue", CanarySpec("gray", 10, "customer_id"))


@pytest.mark.parametrize(("slot", "message"), [
    ("purple", "registered"), ("blue", "active"), ("gray", "canary")])
def test_the_table_refuses_a_bad_shadow(slot: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        three_slots().with_shadow(ShadowSpec(slot, 50))


@pytest.mark.parametrize(("body", "message"), [
    (b'{"slot": "green", "weight": 5}', "'weight'"),
    (b'{"slot": "green", "percent": 0}', "'percent'"),
    (b'{"slot": "green", "percent": 101}', "'percent'"),
    (b'{"slot": "green", "percent": "50"}', "'percent'"),
    (b'{"slot": "green", "percent": 12.5}', "'percent'"),
    (b'{"slot": "green", "percent": true}', "'percent'"),
    (b'{"slot": "Green!"}', "slot"),
    (b'{"slot": null, "percent": 10}', "'slot': null"),
    (b'["green"]', "JSON object"),
    (b"\xff", "invalid shadow request"),
])
def test_the_admin_request_is_validated(body: bytes, message: str) -> None:
    with pytest.raises(ClientError) as refused:
        parse_shadow(body)
    assert refused.value.status == 400 and message in str(refused.value.message)


@pytest.mark.integration
def test_the_shadow_admin_action_is_authenticated_validated_and_persisted(
        tmp_path: Path) -> None:
    proxy = ensure_proxy("shadowadmin", deploy_mod.free_port(), tmp_path)
    url = f"{proxy.url}/__proxy/shadow"
    auth = {"Authorization": f"Bearer {proxy.token}"}
    persisted = proxy.state_dir / proxy_mod.STATE_FILE
    try:
        proxy_mod.switch(proxy.port, proxy.token, "http://127.0.0.1:9", "blue", version="1",
                         verify=False)
        body = {"slot": "green", "percent": 25}
        for headers in ({}, {"Authorization": "Bearer nope"},
                        {"Authorization": "Bearer " + "w" * 40}):
            refused = httpx.post(url, json=body, headers=headers, trust_env=False)
            assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized")
        for slot, reason in (("green", "not registered"), ("blue", "is the active slot")):
            refused = httpx.post(url, json={**body, "slot": slot}, headers=auth,
                                 trust_env=False)
            assert (refused.status_code, refused.json()["error"]) == (409, "shadow_refused")
            assert reason in refused.json()["message"]
        bad = httpx.post(url, json={**body, "percent": 0}, headers=auth, trust_env=False)
        assert bad.status_code == 400 and "'percent'" in bad.json()["message"]

        proxy_mod.register(proxy.port, proxy.token, "gray", ["http://127.0.0.1:11"], "3")
        proxy_mod.set_canary(proxy.port, proxy.token, "gray", 10, "customer_id")
        refused = httpx.post(url, json={**body, "slot": "gray"}, headers=auth, trust_env=False)
        assert refused.status_code == 409 and "is the canary slot" in refused.json()["message"]
        proxy_mod.clear_canary(proxy.port, proxy.token)
        assert proxy_mod.get_state(proxy.port)["shadow"] is None

        proxy_mod.register(proxy.port, proxy.token, "green", ["http://127.0.0.1:10"], "2")
        assert proxy_mod.set_shadow(proxy.port, proxy.token, "green", 25)["shadow"] == body
        assert json.loads(persisted.read_text())["shadow"] == body
        canary = httpx.post(f"{proxy.url}/__proxy/canary", json={
            "slot": "green", "weight": 10, "entity_key": "customer_id"}, headers=auth,
            trust_env=False)
        assert canary.status_code == 409  # the shadow's slot takes no live traffic
        with pytest.raises(proxy_mod.ProxyAdminError) as raised:
            proxy_mod.set_shadow(proxy.port, "w" * 40, "green")
        assert raised.value.status == 401
        assert proxy_mod.clear_shadow(proxy.port, proxy.token)["shadow"] is None
        assert "shadow" not in json.loads(persisted.read_text())
    finally:
        undeploy("shadowadmin", tmp_path)


def _marked(**headers: str) -> dict[str, list[tuple[bytes, bytes]]]:
    return {"headers": [(name.lower().encode(), value.encode("latin-1"))
                        for name, value in headers.items()]}


MALFORMED_MARKS = [
    "ABCDEF0123456789ABCDEF0123456789",  # upper case
    "0123456789abcdef0123456789abcde",  # 31 digits
    "0123456789abcdef0123456789abcdefg",  # 33
    "not-a-request-id",
    "",
]


@pytest.mark.parametrize("value", MALFORMED_MARKS)
def test_a_malformed_shadow_mark_is_refused_naming_the_header(value: str) -> None:
    refusal, synthetic, shadow = traffic_marks(_marked(**{SHADOW_HEADER: value}))
    assert (synthetic, shadow) == (None, None) and refusal is not None
    status, error, message, _ = refusal
    assert (status, error) == (400, "invalid_header") and SHADOW_HEADER in message


def test_a_request_marked_shadow_and_synthetic_is_refused() -> None:
    live_id = uuid.uuid4().hex
    assert traffic_marks(_marked(**{SHADOW_HEADER: live_id})) == (None, None, live_id)
    refusal, _, _ = traffic_marks(_marked(**{SHADOW_HEADER: live_id, SYNTHETIC_HEADER: "smoke"}))
    assert refusal is not None and refusal[:2] == (400, "invalid_header")
    assert SHADOW_HEADER in refusal[2] and SYNTHETIC_HEADER in refusal[2]


@pytest.mark.integration
@pytest.mark.parametrize("lane", ["gate", "bentoml"])
def test_the_service_refuses_bad_shadow_marks(model, serve, lane: str) -> None:
    """The direct lane (the request gate) and BentoML's API method both refuse them."""
    server = (serve("shadow-marks-gate") if lane == "gate"
              else serve("shadow-marks-bentoml-lane", MLOPS_SERVING_DIRECT="false"))
    body = {"instances": [{"customer_id": model.known[21], "tenure_days": 90.0}]}
    refused = [httpx.post(f"{server.url}/predict", json=body, headers={SHADOW_HEADER: value})
               for value in MALFORMED_MARKS]
    refused.append(httpx.post(f"{server.url}/predict", json=body, headers={
        SHADOW_HEADER: uuid.uuid4().hex, SYNTHETIC_HEADER: "smoke"}))
    for answer in refused:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_header"
        assert SHADOW_HEADER in answer.json()["message"]
