"""The canary admin action of the stable address (``POST /__proxy/canary``) refuses what it must:
no token or a wrong one (401), a body that is not a canary naming the field (400), a slot that
is not a registered slot other than the active one (409); and what it accepts is persisted.

The request parser and the routing table are called directly; the live action runs against a
real proxy started as a deploy starts it (``ensure_proxy``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from airmlops.serving import deploy as deploy_mod
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy import ensure_proxy, undeploy
from airmlops.serving.proxy.admin import parse_canary
from airmlops.serving.proxy.asgi import ClientError
from airmlops.serving.proxy.table import CanarySpec, RoutingTable, SlotSpec


def table_with_green() -> RoutingTable:
    """Slot blue active, slot green registered (the only valid canary)."""
    blue = SlotSpec("1", ("http://127.0.0.1:9001",))
    green = SlotSpec("2", ("http://127.0.0.1:9002",))
    return RoutingTable({"blue": blue, "green": green}, "blue")


@pytest.mark.parametrize(
    ("canary", "message"),
    [(("blue", 20, "customer_id"), "other than the active one"),
     (("gray", 20, "customer_id"), "registered slot"),
     (("green", 101, "customer_id"), "'weight'"),
     (("green", True, "customer_id"), "'weight'"),
     (("green", 20, "customer id"), "'entity_key'")],
)
def test_the_table_refuses_a_bad_canary(canary: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        table_with_green().with_canary(CanarySpec(*canary))


@pytest.mark.parametrize(
    ("body", "message"),
    [(b'{"slot": "green", "weight": 150, "entity_key": "c"}', "'weight'"),
     (b'{"slot": "green", "weight": "20", "entity_key": "c"}', "'weight'"),
     (b'{"slot": "green", "weight": 20}', "'entity_key'"),
     (b'{"slot": "Green!", "weight": 20, "entity_key": "c"}', "slot name"),
     (b'{"slot": null, "weight": 20}', "no other field"),
     (b'{"slot": "green", "weight": 20, "entity_key": "c", "x": 1}', "unknown field"),
     (b"[]", "JSON object")],
)
def test_the_admin_request_is_validated(body: bytes, message: str) -> None:
    with pytest.raises(ClientError) as refused:
        parse_canary(body)
    assert refused.value.status == 400 and message in str(refused.value.message)


@pytest.mark.integration
def test_the_canary_admin_action_is_authenticated_validated_and_persisted(
        tmp_path: Path) -> None:
    proxy = ensure_proxy("canaryadmin", deploy_mod.free_port(), tmp_path)
    url = f"{proxy.url}/__proxy/canary"
    auth = {"Authorization": f"Bearer {proxy.token}"}
    try:
        proxy_mod.switch(proxy.port, proxy.token, "http://127.0.0.1:9", "blue", version="1",
                         verify=False)
        body = {"slot": "green", "weight": 20, "entity_key": "customer_id"}
        assert httpx.post(url, json=body, trust_env=False).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"},
                          trust_env=False).status_code == 401
        unknown = httpx.post(url, json=body, headers=auth, trust_env=False)
        assert unknown.status_code == 409 and "registered slot" in unknown.json()["message"]
        active = httpx.post(url, json={**body, "slot": "blue"}, headers=auth, trust_env=False)
        assert active.status_code == 409
        bad = httpx.post(url, json={**body, "weight": 101}, headers=auth, trust_env=False)
        assert bad.status_code == 400 and "'weight'" in bad.json()["message"]
        with pytest.raises(ValueError, match="'entity_key'"):
            proxy_mod.set_canary(proxy.port, proxy.token, "green", 20, "a b")

        proxy_mod.register(proxy.port, proxy.token, "green", ["http://127.0.0.1:10"], "2")
        answer = proxy_mod.set_canary(proxy.port, proxy.token, "green", 20, "customer_id")
        assert answer["canary"] == body
        assert proxy_mod.get_state(proxy.port)["canary"] == body
        persisted = json.loads((proxy.state_dir / proxy_mod.STATE_FILE).read_text())
        assert persisted["canary"] == body
        assert proxy_mod.clear_canary(proxy.port, proxy.token)["canary"] is None
        assert proxy_mod.get_state(proxy.port)["canary"] is None
        assert "canary" not in json.loads((proxy.state_dir / proxy_mod.STATE_FILE).read_text())
    finally:
        undeploy("canaryadmin", tmp_path)
