"""Threads from what is busy (launcher/placement/thread_share.py)."""

from __future__ import annotations

from launcher.placement.thread_share import share_threads


def test_a_server_busy_alone_gets_every_cpu_and_the_idle_one_is_ready_to_share() -> None:
    share = share_threads(["a", "b"], busy=["a"], cpus=8)
    assert dict(share.threads) == {"a": 8, "b": 4}
    assert share.describe() == "8 of 8 CPUs; busy: a 8"


def test_busy_servers_split_the_cpus_and_never_exceed_them() -> None:
    for cpus in (1, 2, 3, 8, 16):
        for busy in (["a"], ["a", "b"], ["a", "b", "c"]):
            share = share_threads(["a", "b", "c"], busy, cpus)
            assert sum(share.threads[n] for n in busy) <= max(cpus, len(busy))
            assert all(count >= 1 for count in share.threads.values())
    assert dict(share_threads(["a", "b", "c"], ["a", "b", "c"], 8).threads) == {"a": 3, "b": 3, "c": 2}


def test_nothing_busy_holds_all_ready_and_other_programs_count_as_busy() -> None:
    assert dict(share_threads(["a", "b"], [], 4).threads) == {"a": 4, "b": 4}
    beside = share_threads(["a"], ["a"], 8, others_busy=2.4)
    assert beside.threads["a"] == 6 and beside.others == 2
    assert "(2 busy with other programs)" in beside.describe()
    assert share_threads(["a"], ["a"], 2, others_busy=5).threads["a"] == 1  # never below one
