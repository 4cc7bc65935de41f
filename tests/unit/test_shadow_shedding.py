"""The mirror's shedding rule, without processes: copies are shed while the live slot answers
slower than lately (:class:`~airmlops.serving.proxy.shadow.LivePressure`), and the mirror drops
new and queued copies (counted) while it does."""

from __future__ import annotations

import asyncio

from airmlops.serving.proxy.routing import Router
from airmlops.serving.proxy.shadow import CopyBudget, LivePressure, Mirror, ShadowCopy
from airmlops.serving.proxy.table import RoutingTable, ShadowSpec, SlotSpec

RID = "0" * 32  # selected at any percent (its first 8 hex digits are 0)


class Feed:
    """Cumulative live statistics fed to a rule, one window at a time."""

    def __init__(self, rule: LivePressure, slot: str = "a") -> None:
        self.rule, self.slot, self.now, self.answers, self.sum_ms = rule, slot, 0.0, 0, 0.0

    def window(self, answers: int, mean_ms: float) -> bool:
        """``answers`` more answers of ``mean_ms`` each, one interval later; the verdict."""
        self.now += 1.0
        self.answers += answers
        self.sum_ms += answers * mean_ms
        return self.rule.update(self.now, self.slot, self.answers, self.sum_ms)


def test_steady_latency_never_sheds_and_a_slower_window_does_until_one_is_back() -> None:
    feed = Feed(LivePressure(interval=1.0))
    assert [feed.window(100, 3.0) for _ in range(5)] == [False] * 5
    assert feed.window(100, 3.5) is False  # 17 % slower: within the margin
    assert feed.window(100, 6.0) is True
    assert feed.window(100, 9.0) is True
    assert feed.window(100, 3.2) is False


def test_fast_answers_jittering_by_less_than_the_floor_are_no_pressure() -> None:
    feed = Feed(LivePressure(interval=1.0))
    feed.window(100, 1.0)
    feed.window(100, 1.0)
    assert feed.window(100, 1.8) is False  # 80 % slower, but under 1 ms
    assert feed.window(100, 2.2) is True


def test_small_windows_change_nothing_and_grow_until_they_count() -> None:
    feed = Feed(LivePressure(interval=1.0, min_answers=20))
    feed.window(100, 2.0)
    feed.window(100, 2.0)
    assert feed.window(100, 10.0) is True
    assert feed.window(5, 1.0) is True  # 5 answers: the verdict stands
    assert feed.window(15, 2.0) is False  # 20 answers since the last look: back under


def test_looks_come_at_most_once_per_interval() -> None:
    rule = LivePressure(interval=0.25)
    assert rule.update(0.0, "a", 0, 0.0) is False
    assert rule.update(0.3, "a", 100, 200.0) is False
    assert rule.update(0.4, "a", 200, 2200.0) is False  # too soon after the last look
    assert rule.update(0.6, "a", 200, 2200.0) is True


def test_a_lasting_slowdown_becomes_the_new_baseline() -> None:
    feed = Feed(LivePressure(interval=1.0, memory=3))
    feed.window(100, 2.0)
    feed.window(100, 2.0)
    assert [feed.window(100, 8.0) for _ in range(4)] == [True, True, True, False]


def test_a_switch_of_the_live_slot_starts_afresh() -> None:
    feed = Feed(LivePressure(interval=1.0))
    feed.window(100, 2.0)
    feed.window(100, 2.0)
    assert feed.window(100, 9.0) is True
    feed.slot = "b"
    assert feed.window(100, 9.0) is False  # first look at the new slot
    assert feed.window(100, 9.0) is False


def shadowed_router() -> Router:
    """Slot a active, slot b its shadow at 100 %."""
    table = RoutingTable({"a": SlotSpec("1", ("http://127.0.0.1:9001",)),
                          "b": SlotSpec("2", ("http://127.0.0.1:9002",))}, "a")
    return Router(table.with_shadow(ShadowSpec("b", 100)))


def test_the_mirror_drops_new_and_queued_copies_while_shedding() -> None:
    async def scenario() -> tuple[dict[str, int], int]:
        router = shadowed_router()
        counters: dict[str, int] = {}
        rule = LivePressure(interval=1.0)
        mirror = Mirror(router, counters, pool=lambda: None, read_timeout=1.0,  # type: ignore
                        pressure=rule)
        mirror.queue.put_nowait(ShadowCopy(RID, "/predict", [], b"{}"))  # queued before
        rule.shedding, rule._next = True, float("inf")  # under pressure, no look due
        mirror.offer(router.shadow, [(b"x-request-id", RID.encode())], "/predict", [], b"{}")
        tasks = mirror.start()
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return counters, mirror.queue.qsize()

    counters, queued = asyncio.run(scenario())
    assert (counters["shadow_shed"], counters["shadow_dropped"], counters["shadow_mirrored"],
            queued) == (2, 0, 0, 0)


def test_the_mirror_reads_the_live_slots_statistics() -> None:
    router = shadowed_router()
    mirror = Mirror(router, {}, pool=lambda: None, read_timeout=1.0,  # type: ignore[arg-type]
                    pressure=LivePressure(interval=0.0))
    live = router.stats_for("a")
    verdicts = []
    for mean_s in (0.002, 0.002, 0.002, 0.010):
        for _ in range(50):
            live.record(200, mean_s)
        verdicts.append(mirror.under_pressure())
    assert verdicts == [False, False, False, True]
    router.stats_for("b").record(200, 1.0)  # the shadow's own answers do not count
    assert mirror.under_pressure() is True


def test_the_budget_is_unlimited_until_pressure_then_half_the_rate_sent() -> None:
    budget = CopyBudget(step=10.0, floor=5.0, burst=0.1)
    assert all(budget.take(index / 1000) for index in range(500))  # 1,000/s: all pass
    budget.adjust(0.5, pressure=False)
    assert budget.rate is None  # calm: still unlimited
    assert all(budget.take(0.5 + index / 1000) for index in range(250))
    budget.adjust(0.75, pressure=True)
    assert budget.rate == 500.0  # half of the 1,000/s sent in that window


def test_the_budget_grows_by_a_step_when_calm_and_halves_under_pressure() -> None:
    budget = CopyBudget(step=10.0, floor=5.0, burst=0.1)
    budget.take(0.0)
    budget.adjust(1.0, pressure=True)  # 1 copy in 1 s: half of it, but not under the floor
    assert budget.rate == 5.0
    for look in range(2, 12):
        budget.adjust(float(look), pressure=False)
    assert budget.rate == 105.0
    budget.adjust(12.0, pressure=True)
    assert budget.rate == 5.0  # what was sent since the last look (nothing) bounds it too


def test_the_budget_spends_its_rate_without_bursts() -> None:
    budget = CopyBudget(step=10.0, floor=5.0, burst=0.1)
    budget.take(0.0)
    budget.adjust(1.0, pressure=True)
    budget.rate = 100.0  # 100 copies/s, at most 10 at once
    taken = sum(budget.take(1.0 + index / 1000) for index in range(2000))  # 1,000/s offered
    assert 195 <= taken <= 215  # 2 s at 100/s, plus at most one burst
    assert sum(budget.take(3.0) for _ in range(50)) <= 1  # all at once: the bucket is empty


def test_the_mirror_sheds_copies_over_the_budget_and_starts_afresh_for_a_new_shadow() -> None:
    router = shadowed_router()
    counters: dict[str, int] = {}
    budget = CopyBudget(floor=5.0, burst=0.1)
    mirror = Mirror(router, counters, pool=lambda: None, read_timeout=1.0,  # type: ignore
                    pressure=LivePressure(interval=1e9), budget=budget)
    mirror.tasks = [object()]  # type: ignore[list-item]  # no workers: copies stay queued
    budget.take(0.0)
    budget.adjust(1.0, pressure=True)  # 5 copies/s from now on
    for _ in range(20):
        mirror.offer(router.shadow, [(b"x-request-id", RID.encode())], "/predict", [], b"{}")
    assert (mirror.queue.qsize(), counters["shadow_shed"]) == (1, 19)
    router.install(router.table.with_shadow(ShadowSpec("b", 50)))  # set again: fresh budget
    mirror.offer(router.shadow, [(b"x-request-id", RID.encode())], "/predict", [], b"{}")
    assert mirror.budget is not budget and mirror.budget.rate is None
    assert mirror.queue.qsize() == 2


def test_the_state_shows_the_budget_once_there_is_one() -> None:
    from airmlops.serving.proxy.admin import render_state

    router = shadowed_router()
    assert render_state(router, {}, 1, "boot")["shadow_budget_per_s"] is None
    assert render_state(router, {}, 1, "boot", 12.345)["shadow_budget_per_s"] == 12.3
