"""Credentials: the API key on the control plane and the envd access token on the data plane
(§6 item 26).

The gateway checks API keys only when started with `COPPICE_API_KEYS`; `COPPICE_E2E_AUTH`
tells the suite which way the gateway under test runs (`keys` or `open`), and the tests for
the other way skip. `cargo xtask e2e` runs this module against both.
"""

import os
import uuid

import httpx
import pytest
from e2b import AuthenticationException, Sandbox

pytestmark = pytest.mark.auth

MODE = os.environ.get("COPPICE_E2E_AUTH", "")

needs_keys = pytest.mark.skipif(
    MODE != "keys", reason="needs a gateway with COPPICE_API_KEYS (COPPICE_E2E_AUTH=keys)"
)
needs_open = pytest.mark.skipif(
    MODE != "open", reason="needs a gateway without COPPICE_API_KEYS (COPPICE_E2E_AUTH=open)"
)


def random_key() -> str:
    return f"e2e-{uuid.uuid4().hex}"


@needs_keys
def test_wrong_api_key_is_refused(factory):
    sbx = factory.create()
    wrong = random_key()
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=wrong)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=wrong).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.get_info(sbx.sandbox_id, api_key=wrong)
    with pytest.raises(AuthenticationException):
        Sandbox.set_timeout(sbx.sandbox_id, 5, api_key=wrong)
    with pytest.raises(AuthenticationException):
        Sandbox.kill(sbx.sandbox_id, api_key=wrong)
    # None of that touched the sandbox.
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    assert 250 < (sbx.get_info().end_at - sbx.get_info().started_at).total_seconds()


@needs_keys
def test_every_configured_key_works(factory):
    second = os.environ.get("COPPICE_E2E_SECOND_KEY")
    if not second:
        pytest.skip("COPPICE_E2E_SECOND_KEY (another key in COPPICE_API_KEYS) is unset")
    sbx = factory.create(api_key=second)
    assert sbx.commands.run("echo second").stdout == "second\n"
    assert Sandbox.kill(sbx.sandbox_id, api_key=second) is True


@needs_open
def test_any_api_key_is_accepted(factory):
    sbx = factory.create(api_key=random_key())
    assert sbx.commands.run("echo open").stdout == "open\n"
    assert Sandbox.get_info(sbx.sandbox_id, api_key=random_key()).sandbox_id == sbx.sandbox_id
    assert Sandbox.kill(sbx.sandbox_id, api_key=random_key()) is True


def envd_request(sbx, path: str, token, method="POST", **kwargs) -> httpx.Response:
    """A raw data-plane request to `sbx`'s envd, with `token` as `X-Access-Token` (if any)."""
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "Connect-Protocol-Version": "1",
    }
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.request(
        method,
        os.environ["E2B_SANDBOX_URL"].rstrip("/") + path,
        headers=headers,
        timeout=30,
        **kwargs,
    )


def test_envd_needs_the_access_token(factory):
    """Knowing a sandbox's id is not enough to run commands or read files in it."""
    sbx = factory.create()
    token = sbx._envd_access_token
    assert token, "create returned no envdAccessToken: anyone can drive envd"
    for wrong in (None, "wrong-" + token):
        r = envd_request(sbx, "/process.Process/List", wrong, json={})
        assert r.status_code == 401, (wrong, r.status_code, r.text)
        r = envd_request(sbx, "/files?path=/etc/hostname", wrong, method="GET")
        assert r.status_code == 401, (wrong, r.status_code, r.text)
    r = envd_request(sbx, "/process.Process/List", token, json={})
    assert r.status_code == 200, r.text
    assert "processes" in r.json() or r.json() == {}
