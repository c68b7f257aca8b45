"""Sandbox metrics through the SDK: `get_metrics()` on an instance and as a class method, with
and without `start`/`end`, sync and async, and on a killed sandbox (§6 item 27)."""

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxNotFoundException

from support import wait_until

GIB = 1 << 30


def check_sample(m):
    """One `SandboxMetrics` as a running default sandbox has it."""
    assert m.cpu_count == 2
    assert 0.0 <= m.cpu_used_pct <= 100.0
    assert m.mem_total == GIB
    assert 0 < m.mem_used <= m.mem_total
    assert m.disk_total > 0 and m.disk_used >= 0
    assert m.mem_cache >= 0
    age = (datetime.now(timezone.utc) - m.timestamp).total_seconds()
    assert -5 < age < 120, m.timestamp


def test_get_metrics(factory):
    sbx = factory.create()
    # A running sandbox has a sample from the start (E2B may answer [] for its first 5 s).
    metrics = sbx.get_metrics()
    assert len(metrics) >= 1
    for m in metrics:
        check_sample(m)

    # The gateway samples every 5 s; the history grows, oldest first.
    history = wait_until(
        lambda: (lambda h: h if len(h) >= 2 else None)(sbx.get_metrics()),
        30,
        "a second sample",
        interval=0.5,
    )
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)

    # start/end travel as Unix seconds and bound the samples.
    now = datetime.now(timezone.utc)
    same = Sandbox.get_metrics(
        sbx.sandbox_id, start=now - timedelta(minutes=10), end=now + timedelta(seconds=5)
    )
    assert [m.timestamp for m in same][: len(stamps)] == stamps
    later = Sandbox.get_metrics(sbx.sandbox_id, start=stamps[-1].replace(microsecond=0))
    assert later and all(m.timestamp >= stamps[-1].replace(microsecond=0) for m in later)
    assert sbx.get_metrics(start=now - timedelta(days=2), end=now - timedelta(days=1)) == []

    sbx.kill()
    with pytest.raises(SandboxNotFoundException):
        sbx.get_metrics()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics(sbx.sandbox_id)


def test_get_metrics_async(factory):
    async def flow():
        sbx = await factory.acreate()
        metrics = await sbx.get_metrics()
        assert len(metrics) >= 1
        check_sample(metrics[-1])
        same = await AsyncSandbox.get_metrics(sbx.sandbox_id)
        assert same[0].timestamp == metrics[0].timestamp

    asyncio.run(flow())
