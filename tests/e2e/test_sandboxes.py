"""The control plane: create, info, kill, timeouts, pause/connect, list, unknown ids, and two
sandboxes behind one port (§6 items 1, 2, 20-25, 35)."""

import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from e2b import (
    Sandbox,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    SandboxUnreachableException,
)

from support import RUN_KEY, RUN_ID, unique, wait_until

SANDBOX_ID = re.compile(r"^[a-z0-9]+$")

# The sandbox does not answer: what the SDK raises for a killed, expired or paused sandbox.
UNREACHABLE = (SandboxNotRunningException, SandboxUnreachableException)


def seconds_from_now(moment: datetime) -> float:
    return (moment - datetime.now(timezone.utc)).total_seconds()


def test_create_defaults(factory):
    sbx = factory.create()
    assert SANDBOX_ID.match(sbx.sandbox_id), sbx.sandbox_id
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.state == SandboxState.RUNNING
    assert info.metadata == {RUN_KEY: RUN_ID}
    # The default lifetime is five minutes.
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 290 <= lifetime <= 310, lifetime
    assert abs(seconds_from_now(info.started_at)) < 60
    assert sbx.is_running() is True


def test_create_with_options(factory):
    sbx = factory.create(
        template="base",
        timeout=120,
        metadata={"user": "alice", "purpose": "e2e"},
        envs={"E2E_A": "1", "E2E_B": "two words"},
    )
    info = sbx.get_info()
    assert info.metadata == {"user": "alice", "purpose": "e2e", RUN_KEY: RUN_ID}
    assert 115 <= seconds_from_now(info.end_at) <= 125
    assert sbx.commands.run('echo "$E2E_A|$E2E_B"').stdout == "1|two words\n"


def test_kill(factory):
    sbx = factory.create()
    assert sbx.is_running() is True
    assert sbx.kill() is True
    assert sbx.is_running() is False
    assert sbx.kill() is False
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo hi")
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("/etc/hostname")
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()


def test_set_timeout_moves_end_and_expiry_kills(factory):
    sbx = factory.create()
    sbx.set_timeout(10)
    assert 7 <= seconds_from_now(sbx.get_info().end_at) <= 12
    # set_timeout overwrites, so it may lengthen ...
    sbx.set_timeout(600)
    assert 595 <= seconds_from_now(sbx.get_info().end_at) <= 602
    # ... and shorten; at the end of its timeout the sandbox is killed.
    sbx.set_timeout(1)

    def gone():
        try:
            Sandbox.get_info(sbx.sandbox_id)
            return False
        except SandboxNotFoundException:
            return True

    wait_until(gone, timeout=15, what="the expired sandbox to be gone")
    assert sbx.is_running() is False
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo hi")
    assert Sandbox.kill(sbx.sandbox_id) is False


def test_pause_and_connect(factory):
    sbx = factory.create()
    sbx.files.write("/home/user/state.txt", "kept")
    sleeper = sbx.commands.run("sleep 300", background=True)

    assert sbx.pause() is True
    assert sbx.pause() is False
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.state == SandboxState.PAUSED
    assert sbx.is_running() is False
    started = time.monotonic()
    with pytest.raises(UNREACHABLE):
        sbx.commands.run("echo hi", timeout=10)
    assert time.monotonic() - started < 5, "a paused sandbox's data plane hung"

    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.sandbox_id == sbx.sandbox_id
    assert resumed.get_info().state == SandboxState.RUNNING
    assert resumed.is_running() is True
    # The filesystem and the processes survive the pause.
    assert resumed.files.read("/home/user/state.txt") == "kept"
    assert sleeper.pid in {p.pid for p in resumed.commands.list()}
    assert resumed.commands.run("echo back").stdout == "back\n"
    # The old handle works again too.
    assert sbx.commands.run("echo old").stdout == "old\n"


def test_resume_keeps_what_was_left_of_the_window_or_the_given_timeout(factory):
    # Coppice's documented choice (docs/api.md): paused time does not consume the window, so a
    # resume gets the larger of what was left when it paused and the timeout it is resumed with.
    sbx = factory.create(timeout=600)
    assert sbx.pause() is True
    Sandbox.connect(sbx.sandbox_id, timeout=120)
    assert 590 <= seconds_from_now(sbx.get_info().end_at) <= 602
    assert sbx.pause() is True
    Sandbox.connect(sbx.sandbox_id, timeout=900)
    assert 895 <= seconds_from_now(sbx.get_info().end_at) <= 902


def test_connect_running_only_extends_timeout(factory):
    sbx = factory.create(timeout=300)
    before = sbx.get_info().end_at
    again = Sandbox.connect(sbx.sandbox_id, timeout=10)
    assert again.commands.run("echo same").stdout == "same\n"
    assert abs((sbx.get_info().end_at - before).total_seconds()) < 2, "connect shortened"
    sbx.connect(timeout=900)
    assert 895 <= seconds_from_now(sbx.get_info().end_at) <= 902


def test_auto_pause_on_timeout(factory):
    sbx = factory.create(timeout=60, lifecycle={"on_timeout": "pause"})
    sbx.files.write("/home/user/before-timeout.txt", "kept")
    sbx.set_timeout(1)
    wait_until(
        lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED,
        timeout=15,
        what="the timed-out sandbox to be paused",
    )
    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.files.read("/home/user/before-timeout.txt") == "kept"


def list_all(**kwargs):
    paginator = Sandbox.list(**kwargs)
    found = []
    while paginator.has_next:
        found.extend(paginator.next_items())
    return found


def test_list(factory):
    tag = unique("list")
    first = factory.create(metadata={"e2e-list": tag, "k y": "v&1"})
    second = factory.create(metadata={"e2e-list": tag})
    assert second.pause() is True
    mine = SandboxQuery(metadata={"e2e-list": tag})

    # Without a state filter, running and paused sandboxes both appear.
    states = {i.sandbox_id: i.state for i in list_all(query=mine)}
    assert states == {
        first.sandbox_id: SandboxState.RUNNING,
        second.sandbox_id: SandboxState.PAUSED,
    }
    listed = {i.sandbox_id: i for i in list_all(query=mine)}
    assert listed[first.sandbox_id].metadata == {
        "e2e-list": tag,
        "k y": "v&1",
        RUN_KEY: RUN_ID,
    }

    running = SandboxQuery(metadata={"e2e-list": tag}, state=[SandboxState.RUNNING])
    assert [i.sandbox_id for i in list_all(query=running)] == [first.sandbox_id]
    paused = SandboxQuery(metadata={"e2e-list": tag}, state=[SandboxState.PAUSED])
    assert [i.sandbox_id for i in list_all(query=paused)] == [second.sandbox_id]

    # Metadata whose key and value need escaping still matches exactly.
    special = SandboxQuery(metadata={"e2e-list": tag, "k y": "v&1"})
    assert [i.sandbox_id for i in list_all(query=special)] == [first.sandbox_id]
    wrong = SandboxQuery(metadata={"e2e-list": tag, "k y": "v"})
    assert list_all(query=wrong) == []

    # Paging: one per page, two pages, then no more.
    paginator = Sandbox.list(query=mine, limit=1)
    pages = []
    while paginator.has_next:
        pages.append([i.sandbox_id for i in paginator.next_items()])
        assert len(pages) <= 3, f"paging does not end: {pages}"
    assert [len(p) for p in pages] == [1, 1]
    assert {p[0] for p in pages} == {first.sandbox_id, second.sandbox_id}

    # Ordered by start time.
    asc = list_all(query=mine, order="asc")
    desc = list_all(query=mine, order="desc")
    assert [i.started_at for i in asc] == sorted(i.started_at for i in asc)
    assert [i.sandbox_id for i in desc] == [i.sandbox_id for i in reversed(asc)]
    if asc[0].started_at != asc[1].started_at:
        assert [i.sandbox_id for i in asc] == [first.sandbox_id, second.sandbox_id]

    # startedAfter is "at or after" (E2B's OpenAPI): a sandbox's own start time finds it.
    started = first.get_info().started_at
    at = SandboxQuery(metadata={"e2e-list": tag}, started_after=started)
    assert first.sandbox_id in {i.sandbox_id for i in list_all(query=at)}
    later = SandboxQuery(metadata={"e2e-list": tag}, started_after=started + timedelta(hours=1))
    assert list_all(query=later) == []


def test_unknown_sandbox_id():
    missing = "e2enosuchsandbox0000"
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(missing)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(missing, 30)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(missing)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(missing)
    assert Sandbox.kill(missing) is False


def test_two_sandboxes_on_one_port(factory):
    a = factory.create(envs={"WHO": "a"})
    b = factory.create(envs={"WHO": "b"})
    assert a.sandbox_id != b.sandbox_id
    a.files.write("/home/user/who.txt", "file-a")
    b.files.write("/home/user/who.txt", "file-b")

    def check(sbx, name):
        out = sbx.commands.run("echo $WHO; cat /home/user/who.txt; echo").stdout
        assert out == f"{name}\nfile-{name}\n", out
        assert sbx.files.read("/home/user/who.txt") == f"file-{name}"

    # Interleaved, concurrent traffic to both through the same gateway port.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(check, s, n) for _ in range(6) for s, n in ((a, "a"), (b, "b"))]
        for f in futures:
            f.result()

    assert a.kill() is True
    with pytest.raises(SandboxNotRunningException):
        a.commands.run("echo a")
    check(b, "b")
