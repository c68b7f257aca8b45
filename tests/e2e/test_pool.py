"""Warm pools as an API (Coppice's `/pool` routes) with plain HTTP beside the real SDK: a pool
warmed through the API serves `Sandbox.create`, and a drain leaves the sandbox it served alone.

The gateway's own test (`bins/coppice-gateway/tests/gateway_pool.rs`) covers every refusal and
a restart; this checks the routes as an operator's script would drive them. The base pool's
target is restored afterwards: the rest of the suite shares this gateway.
"""

import os

import httpx
import pytest

from support import wait_until


def call(method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method,
        os.environ["E2B_API_URL"].rstrip("/") + path,
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
        timeout=60,
        **kwargs,
    )


def pool(template: str) -> dict:
    res = call("GET", "/pool")
    assert res.status_code == 200, res.text
    by_id = {p["templateID"]: p for p in res.json()}
    assert sorted(by_id) == ["base", "code-interpreter-v1"]
    return by_id[template]


@pytest.fixture
def base_target():
    """The base pool's target before the test, put back after it."""
    before = pool("base")["target"]
    yield before
    res = call("POST", "/pool/base/warm", json={"count": before})
    assert res.status_code in (200, 202), res.text


# Filling the pool waits for the gateway's own start-up pools first.
@pytest.mark.timeout(180)
def test_a_warmed_pool_serves_creates_and_drains(factory, base_target):
    first = pool("base")
    assert set(first) == {
        "templateID", "target", "ready", "inUse", "hits", "misses", "lastError",
    }

    res = call("POST", "/pool/base/warm", json={"count": base_target + 1})
    assert res.status_code in (200, 202), res.text
    assert res.json()["target"] == base_target + 1
    wait_until(
        lambda: pool("base")["ready"] == base_target + 1, 120, "the base pool to fill"
    )

    before = pool("base")
    sbx = factory.create()
    after = pool("base")
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"]
    assert after["inUse"] == before["inUse"] + 1

    res = call("POST", "/pool/base/drain")
    assert res.status_code == 200, res.text
    assert res.json()["target"] == 0 and res.json()["ready"] == 0
    assert sbx.commands.run("echo served").stdout == "served\n"

    bad = call("POST", "/pool/base/warm", json={"count": "many"})
    assert bad.status_code == 400
    assert bad.json()["code"] == 400 and "count" in bad.json()["message"]
    unknown = call("POST", "/pool/no-such-template/drain")
    assert unknown.status_code == 404
    assert unknown.json()["code"] == 404
