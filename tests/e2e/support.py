"""Helpers the tests share (conftest.py holds the fixtures)."""

import time
import uuid
from typing import Callable, TypeVar

import pytest

RUN_ID = uuid.uuid4().hex[:12]
"""Tags every sandbox this session creates (metadata key `RUN_KEY`)."""

RUN_KEY = "coppice-e2e-run"

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Polls `probe` until it returns something truthy; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def tagged(metadata=None):
    """`metadata` plus this run's tag."""
    return {**(metadata or {}), RUN_KEY: RUN_ID}


def unique(prefix: str) -> str:
    """A name no other test uses, for paths and markers inside shared sandboxes."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
