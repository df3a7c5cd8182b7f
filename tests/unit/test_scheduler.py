"""The scheduling rules as pure functions over crafted queues and budgets."""

from __future__ import annotations

from launcher.placement.scheduler import ModelView, never_fits, schedule, victim_order

MIB = 1024**2
GIB = 1024**3


def loaded(name: str, required: int = GIB, **kw: object) -> ModelView:
    fields: dict[str, object] = {"resident": True, "evictable": True, **kw}
    return ModelView(name, required, **fields)  # type: ignore[arg-type]


def wanted(name: str, required: int = GIB, since: float = 0.0, queued: int = 1,
           **kw: object) -> ModelView:
    return ModelView(name, required, queued=queued, oldest_wait=since, **kw)  # type: ignore[arg-type]


def test_a_model_that_fits_loads_without_victims() -> None:
    plan = schedule([loaded("a"), wanted("b")], 4 * GIB, 0, now=1.0, max_wait=10)
    assert [(x.name, x.victims, x.cause) for x in plan.loads] == [("b", (), "fits")]


def test_idle_models_make_room_cheapest_to_reload_first_then_lru() -> None:
    models = [
        loaded("slow", load_seconds=9.0, last_used=1.0),
        loaded("quick-old", load_seconds=0.5, last_used=1.0),
        loaded("quick-new", load_seconds=0.5, last_used=5.0),
        wanted("x", since=6.0),
    ]
    plan = schedule(models, 3 * GIB, 0, now=7.0, max_wait=10)
    assert plan.loads[0].victims == ("quick-old",)
    assert plan.loads[0].cause == "idle"
    # two victims needed: both quick ones before the slow one
    plan = schedule([*models[:3], wanted("x", 2 * GIB, since=6.0)], 3 * GIB, 0, 7.0, 10)
    assert plan.loads[0].victims == ("quick-old", "quick-new")
    # unmeasured models rank by size
    order = victim_order([loaded("big", 3 * GIB), loaded("small", 100 * MIB)])
    assert [m.name for m in order] == ["small", "big"]


def test_busy_and_pinned_models_are_never_victims_the_request_waits() -> None:
    models = [loaded("busy", in_flight=1), loaded("pinned", pinned=True), wanted("x", since=0.0)]
    plan = schedule(models, 2 * GIB, 0, now=1.0, max_wait=10)
    assert plan.loads == () and plan.refused == ()  # waits: not a 503
    assert plan.waiting[0][0] == "x" and "busy" in plan.waiting[0][1]


def test_a_loaded_models_queue_is_its_batch_not_a_victim() -> None:
    # a is between two of its queued requests (nothing in flight): b still waits its turn
    models = [loaded("a", queued=3, oldest_wait=0.5), wanted("b", since=0.0)]
    plan = schedule(models, 1 * GIB, 1, now=2.0, max_wait=10)
    assert plan.loads == () and plan.closed == frozenset()


def test_after_max_wait_the_models_in_the_way_drain_then_go() -> None:
    busy = [loaded("a", in_flight=1, queued=5, oldest_wait=0.5), wanted("b", since=0.0)]
    plan = schedule(busy, 1 * GIB, 1, now=10.5, max_wait=10)
    assert plan.closed == frozenset({"a"}) and plan.loads == ()  # never cut: a drains
    drained = [loaded("a", in_flight=0, queued=5, oldest_wait=0.5), wanted("b", since=0.0)]
    plan = schedule(drained, 1 * GIB, 1, now=11.0, max_wait=10)
    assert [(x.name, x.victims, x.cause) for x in plan.loads] == [("b", ("a",), "max_wait")]


def test_oldest_waiter_first() -> None:
    models = [loaded("a"), wanted("late", since=5.0), wanted("early", since=1.0)]
    plan = schedule(models, 1 * GIB, 0, now=6.0, max_wait=10)
    assert [x.name for x in plan.loads] == ["early"]
    assert plan.loads[0].victims == ("a",)
    assert plan.waiting[0][0] == "late"  # a's memory went to early


def test_a_model_that_can_never_fit_is_refused_naming_the_limit() -> None:
    alone = schedule([wanted("huge", 5 * GIB)], 4 * GIB, 0, now=0.0, max_wait=10)
    assert alone.refused[0][0] == "huge"
    assert "the RAM budget 4.00 GiB cannot hold it even alone" in alone.refused[0][1]
    pinned = [loaded("p", 3 * GIB, pinned=True), wanted("x", 2 * GIB)]
    why = schedule(pinned, 4 * GIB, 0, now=0.0, max_wait=10).refused[0][1]
    assert "held by pinned models (p)" in why
    count = never_fits(wanted("x", MIB), [loaded("p", MIB, pinned=True)], GIB, max_loaded=1)
    assert count is not None and "max_loaded=1" in count and "RAM" not in count


def test_max_loaded_is_named_when_it_is_the_limit() -> None:
    plan = schedule([loaded("a", MIB, in_flight=1), wanted("b", MIB)], 8 * GIB, 1, 0.0, 10)
    assert "max_loaded=1 reached by a" in plan.waiting[0][1]


def test_failed_models_are_not_loaded_and_stopping_ones_wait() -> None:
    models = [ModelView("f", MIB, queued=2, oldest_wait=0.0, failed=True),
              ModelView("s", GIB, resident=True, evictable=False, queued=1, oldest_wait=0.0)]
    plan = schedule(models, 8 * GIB, 0, now=1.0, max_wait=10)
    assert plan.loads == ()


def test_a_model_just_loaded_serves_its_batch_before_a_starved_waiter_closes_it() -> None:
    # loads slower than max_wait: both sides' waiters are always "starved"; without the
    # batch window the fresh model was evicted before it served anything (a swap livelock)
    fresh = loaded("a", queued=4, oldest_wait=0.0, ready_since=29.0)
    plan = schedule([fresh, wanted("b", since=1.0)], GIB, 1, now=30.0, max_wait=10)
    assert plan.loads == () and plan.closed == frozenset()
    serving = loaded("a", in_flight=1, queued=3, oldest_wait=0.0, ready_since=29.0)
    later = schedule([serving, wanted("b", since=1.0)], GIB, 1, now=38.5, max_wait=10)
    assert later.closed == frozenset() and later.loads == ()
    done = schedule([serving, wanted("b", since=1.0)], GIB, 1, now=40.0, max_wait=10)
    assert done.closed == frozenset({"a"})  # its batch window is over: drains, then goes
