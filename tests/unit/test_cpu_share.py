"""When lalo tells model servers' OpenMP threads to spin briefly, then sleep, while they wait."""

from __future__ import annotations

import psutil

from launcher.placement.cpu_share import (
    CpuShare,
    cpu_share,
    default_threads,
    policy_line,
    quota_threads,
    to_json,
    usable_cpus,
    wait_env,
)


def test_one_server_keeps_the_engine_default_whatever_the_threads() -> None:
    share = cpu_share([None], cpus=2, engine_default=2)
    assert share == CpuShare(servers=1, threads=2, cpus=2)
    assert not share.oversubscribed
    assert not cpu_share([64], cpus=2).oversubscribed  # alone, spinning costs nobody else
    assert wait_env(share, {}, environ={}) == {}


def test_servers_with_more_threads_than_cpus_spin_briefly_then_sleep() -> None:
    share = cpu_share([None, None, 1], cpus=2, engine_default=2)
    assert share == CpuShare(servers=3, threads=5, cpus=2)
    assert share.oversubscribed
    # libgomp reads the bounded spin (docs/cpu-sharing.md: 0.96x PASSIVE shared, 0.87x spin
    # alone, against PASSIVE's 0.73x); other OpenMP runtimes ignore GOMP_* and sleep
    wanted = {"GOMP_SPINCOUNT": "300", "OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_env(share, {}, environ={}) == wanted
    assert "GOMP_SPINCOUNT=300 OMP_WAIT_POLICY=PASSIVE" in policy_line(share, environ={})
    assert to_json(share, environ={}) == {
        "servers": 3, "threads": 5, "cpus": 2, "oversubscribed": True,
        "openmp_wait": "GOMP_SPINCOUNT=300 OMP_WAIT_POLICY=PASSIVE"}


def test_servers_that_fit_the_cpus_keep_spinning() -> None:
    share = cpu_share([4, 4, None], cpus=16, engine_default=8)
    assert share == CpuShare(servers=3, threads=16, cpus=16)
    assert not share.oversubscribed
    assert wait_env(share, {}, environ={}) == {}
    assert to_json(share, environ={})["openmp_wait"] is None


def test_max_loaded_counts_only_the_servers_that_can_run_at_once() -> None:
    assert not cpu_share([None, None, None], max_loaded=1, cpus=2, engine_default=2).oversubscribed
    # the busiest ones are assumed to be the ones loaded
    share = cpu_share([1, 8, 1, 2], max_loaded=2, cpus=9, engine_default=1)
    assert share == CpuShare(servers=2, threads=10, cpus=9)
    assert share.oversubscribed


def test_a_wait_setting_the_user_gave_is_never_overridden() -> None:
    share = cpu_share([None, None], cpus=2, engine_default=2)
    for name, value in [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000"),
                        ("KMP_BLOCKTIME", "0"), ("KMP_LIBRARY", "turnaround")]:
        assert wait_env(share, {name: value}, environ={}) == {}, name  # the model's env:
        assert wait_env(share, {}, environ={name: value}) == {}, name  # lalo's environment
        assert f"{name}={value}" in policy_line(share, environ={name: value})
        assert to_json(share, environ={name: value})["openmp_wait"] is None


def test_usable_cpus_default_is_this_process_s_affinity() -> None:
    import os

    share = cpu_share([None, None])
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert share.cpus == expected
    # auto threads count as llama.cpp's default: one per physical core
    assert share.threads == 2 * (psutil.cpu_count(logical=False) or os.cpu_count())


def test_a_cpu_quota_bounds_the_cpus_and_auto_threads() -> None:
    import os

    from launcher.machine.limits import CgroupLimits, CpuLimit

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    half = CgroupLimits(cpu=CpuLimit(0.5, 2))
    assert usable_cpus(half) == 1
    assert default_threads(half) == 1
    assert quota_threads(half) == (1 if cores > 1 else None)
    wide = CgroupLimits(cpu=CpuLimit(cores + 1.5, 1))  # a quota above the cores changes nothing
    assert (usable_cpus(wide), default_threads(wide), quota_threads(wide)) == (affinity, cores, None)
    assert quota_threads(CgroupLimits()) is None
