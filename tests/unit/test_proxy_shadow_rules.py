"""The shadow entry of the stable address, without processes: the routing table's rules and
persistence, the admin body, the deterministic selection, the request id, the stripped header
and the shadow route the router computes."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from airmlops.serving import proxy as proxy_mod
from airmlops.serving.proxy.admin import parse_shadow
from airmlops.serving.proxy.asgi import ClientError
from airmlops.serving.proxy.headers import proxied_request_headers
from airmlops.serving.proxy.routing import Router
from airmlops.serving.proxy.shadow import request_id_of, selected
from airmlops.serving.proxy.table import (
    STATE_FILE,
    CanarySpec,
    RoutingTable,
    ShadowSpec,
    SlotSpec,
    load_persisted_table,
    persist_table,
)
from airmlops.serving.shadow_header import SHADOW_HEADER

A = SlotSpec("1", ("http://127.0.0.1:9001",))
B = SlotSpec("2", ("http://127.0.0.1:9002",))
C = SlotSpec("3", ("http://127.0.0.1:9003",))


def table() -> RoutingTable:
    """Slot a active, b and c registered."""
    return RoutingTable({"a": A, "b": B, "c": C}, "a")


def test_a_registered_inactive_slot_becomes_the_shadow() -> None:
    shadowed = table().with_shadow(ShadowSpec("b", 25))
    assert shadowed.shadow == ShadowSpec("b", 25)
    assert ShadowSpec("b").percent == 100
    assert shadowed.with_shadow(None).shadow is None


@pytest.mark.parametrize(("slot", "message"), [
    ("nope", "'nope' is not registered"),
    ("a", "'a' is the active slot"),
    ("c", "'c' is the canary slot"),
])
def test_the_table_refuses_a_shadow_that_already_serves_or_is_unknown(slot: str,
                                                                     message: str) -> None:
    with_canary = table().with_canary(CanarySpec("c", 10, "entity"))
    with pytest.raises(ValueError, match=message):
        with_canary.with_shadow(ShadowSpec(slot))


def test_a_shadow_needs_an_active_slot_and_a_canary_cannot_take_its_slot() -> None:
    with pytest.raises(ValueError, match="needs an active slot"):
        RoutingTable({"b": B}).with_shadow(ShadowSpec("b"))
    with pytest.raises(ValueError, match="'b' is the canary slot"):
        table().with_shadow(ShadowSpec("b")).with_canary(CanarySpec("b", 10, "entity"))


@pytest.mark.parametrize(("spec", "field"), [
    (("b", 0), "'percent'"), (("b", 101), "'percent'"), (("b", True), "'percent'"),
    (("b", "50"), "'percent'"), (("B!", 50), "slot"),
])
def test_a_malformed_shadow_spec_is_refused_naming_the_field(spec: tuple, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ShadowSpec(*spec)


def test_removing_or_activating_the_shadow_slot_ends_the_shadow() -> None:
    shadowed = table().with_shadow(ShadowSpec("b", 40))
    assert shadowed.without_slot("b").shadow is None
    assert shadowed.without_slot("c").shadow == ShadowSpec("b", 40)
    promoted = shadowed.with_slot("b", B, activate=True)
    assert (promoted.active, promoted.shadow) == ("b", None)
    assert shadowed.with_slot("b", C, activate=False).shadow == ShadowSpec("b", 40)
    assert shadowed.with_slot("c", C, activate=True).shadow == ShadowSpec("b", 40)


def test_the_shadow_is_persisted_and_an_older_table_still_loads(tmp_path: Path) -> None:
    shadowed = table().with_shadow(ShadowSpec("b", 40))
    persist_table(tmp_path, shadowed)
    assert json.loads((tmp_path / STATE_FILE).read_text())["shadow"] == {"slot": "b",
                                                                         "percent": 40}
    assert load_persisted_table(tmp_path) == shadowed

    older = {"active": "a", "slots": {"a": A.to_json(), "b": B.to_json()}}
    (tmp_path / STATE_FILE).write_text(json.dumps(older))
    assert load_persisted_table(tmp_path).shadow is None
    assert load_persisted_table(tmp_path).slots.keys() == {"a", "b"}


def test_a_persisted_shadow_of_a_wrong_shape_is_not_loaded(tmp_path: Path) -> None:
    data = {**table().to_json(), "shadow": {"slot": "b"}}
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    assert load_persisted_table(tmp_path) == RoutingTable()


def test_the_admin_body_sets_or_clears_the_shadow() -> None:
    assert parse_shadow(b'{"slot": "b", "percent": 30}') == ShadowSpec("b", 30)
    assert parse_shadow(b'{"slot": "b"}') == ShadowSpec("b", 100)
    assert parse_shadow(b'{"slot": null}') is None


@pytest.mark.parametrize(("body", "named"), [
    (b'{"slot": "b", "weight": 3}', "'weight'"),
    (b'{"slot": "b", "percent": 0}', "'percent'"),
    (b'{"slot": "b", "percent": 101}', "'percent'"),
    (b'{"slot": "b", "percent": 2.5}', "'percent'"),
    (b'{"slot": "b", "percent": false}', "'percent'"),
    (b'{"slot": "b", "percent": "10"}', "'percent'"),
    (b'{"slot": "Blue!"}', "slot"),
    (b'{"slot": 7}', "slot"),
    (b'{"slot": null, "percent": 5}', "'slot': null"),
    (b'["b"]', "JSON object"),
    (b"{not json", "shadow request"),
])
def test_a_malformed_admin_body_is_a_400_naming_the_field(body: bytes, named: str) -> None:
    with pytest.raises(ClientError) as raised:
        parse_shadow(body)
    assert raised.value.status == 400
    assert named in raised.value.message


def test_selection_is_deterministic_and_close_to_the_percent() -> None:
    ids = [secrets.token_hex(16) for _ in range(20_000)]
    for percent in (1, 10, 50, 90):
        chosen = [rid for rid in ids if selected(rid, percent)]
        assert chosen == [rid for rid in ids if selected(rid, percent)]
        assert abs(len(chosen) / len(ids) - percent / 100) < 0.015, percent
    assert all(selected(rid, 100) for rid in ids)
    assert selected("00000063" + "0" * 24, 100) and not selected("00000063" + "0" * 24, 99)
    assert selected("00000064" + "0" * 24, 1)  # 0x64 = 100: bucket 0


def test_only_a_32_lowercase_hex_request_id_is_read() -> None:
    good = "0123456789abcdef" * 2
    assert request_id_of([(b"content-type", b"x"), (b"X-Request-ID", good.encode())]) == good
    for bad in (good.upper(), good[:-1], good + "0", "g" * 32, ""):
        assert request_id_of([(b"x-request-id", bad.encode())]) is None, bad
    assert request_id_of([(b"content-type", b"application/json")]) is None


def test_a_client_shadow_header_is_never_forwarded() -> None:
    scope = {"headers": [(b"host", b"proxy"), (SHADOW_HEADER.lower().encode(), b"forged"),
                         (b"x-client", b"kept")], "client": ("127.0.0.1", 5), "scheme": "http"}
    names = [name.lower() for name, _ in proxied_request_headers(scope)]
    assert SHADOW_HEADER.lower() not in names
    assert "x-client" in names


def test_the_router_mirrors_only_to_a_healthy_serving_upstream() -> None:
    router = Router(table())
    assert router.shadow is None
    router.install(table().with_shadow(ShadowSpec("b", 30)))
    assert router.shadow is not None
    assert (router.shadow.slot, router.shadow.percent) == ("b", 30)
    assert [b.url for b in router.shadow.route.candidates] == list(B.upstreams)
    assert router.shadow.route.owner is router.stats_for("b")
    router.mark(router.backends["b"][0], "refused", fall=1)
    assert router.shadow is None
    router.mark(router.backends["b"][0], None, fall=1)
    assert router.shadow is not None


def test_the_client_refuses_invalid_arguments_before_sending() -> None:
    with pytest.raises(ValueError, match="slot"):
        proxy_mod.set_shadow(1, "token", "Blue!")
    with pytest.raises(ValueError, match="'percent'"):
        proxy_mod.set_shadow(1, "token", "b", 0)
