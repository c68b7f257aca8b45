"""Fixtures for the end-to-end suite: the unmodified E2B SDKs against a running gateway.

The SDKs read the gateway's address from the environment (`E2B_API_URL`, `E2B_SANDBOX_URL`,
`E2B_API_KEY`); `cargo xtask e2e` sets them, and tests/e2e/README.md shows how to run a test by
hand. Every sandbox a test creates goes through a `SandboxFactory`, which kills it in teardown
whatever the test did, and carries the metadata tag `coppice-e2e-run=<run id>`, so that a sweep
at the end of the session can find (and report) any the fixtures missed.
"""

import os
from typing import List

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery
from e2b_code_interpreter import Sandbox as CodeInterpreter

from support import RUN_ID, RUN_KEY, tagged

REQUIRED_ENV = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")


class SandboxFactory:
    """Creates sandboxes and kills every one of them in `cleanup()`."""

    def __init__(self):
        self.ids: List[str] = []

    def create(self, cls=Sandbox, **kwargs):
        kwargs["metadata"] = tagged(kwargs.get("metadata"))
        sbx = cls.create(**kwargs)
        self.ids.append(sbx.sandbox_id)
        return sbx

    async def acreate(self, cls=AsyncSandbox, **kwargs):
        kwargs["metadata"] = tagged(kwargs.get("metadata"))
        sbx = await cls.create(**kwargs)
        self.ids.append(sbx.sandbox_id)
        return sbx

    def cleanup(self):
        failures = []
        for sandbox_id in self.ids:
            try:
                # False (already gone) is fine: the test may have killed it itself.
                Sandbox.kill(sandbox_id)
            except Exception as e:  # noqa: BLE001 - report every failure, then raise
                failures.append(f"{sandbox_id}: {type(e).__name__}: {e}")
        self.ids.clear()
        if failures:
            raise RuntimeError("teardown could not kill: " + "; ".join(failures))


@pytest.fixture(scope="session", autouse=True)
def gateway_session():
    """Checks the environment, and at the end sweeps up sandboxes a fixture missed."""
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        pytest.exit(
            f"set {', '.join(missing)} (see tests/e2e/README.md); "
            "`cargo xtask e2e` starts a gateway and sets them",
            returncode=2,
        )
    if os.environ.get("E2B_DEBUG", "").lower() in ("1", "true"):
        pytest.exit("E2B_DEBUG must be unset: it makes the SDK skip the API", returncode=2)
    yield
    leaked = []
    paginator = Sandbox.list(query=SandboxQuery(metadata={RUN_KEY: RUN_ID}))
    while paginator.has_next:
        for info in paginator.next_items():
            if info.metadata.get(RUN_KEY) == RUN_ID:
                leaked.append(info.sandbox_id)
                Sandbox.kill(info.sandbox_id)
    assert not leaked, f"sandboxes outlived their tests (now killed): {leaked}"


@pytest.fixture
def factory():
    """A factory whose sandboxes die with the test."""
    f = SandboxFactory()
    yield f
    f.cleanup()


@pytest.fixture(scope="module")
def module_factory():
    f = SandboxFactory()
    yield f
    f.cleanup()


@pytest.fixture(scope="module")
def sandbox(module_factory) -> Sandbox:
    """One `base` sandbox shared by a module's tests; they must not break it."""
    return module_factory.create(envs={"E2E_GLOBAL": "global", "E2E_OVERRIDE": "global"})


@pytest.fixture(scope="module")
def interpreter(module_factory) -> CodeInterpreter:
    """One code-interpreter sandbox (template `code-interpreter-v1`) shared by a module."""
    return module_factory.create(
        cls=CodeInterpreter, envs={"E2E_SANDBOX_LEVEL": "from-create"}
    )
