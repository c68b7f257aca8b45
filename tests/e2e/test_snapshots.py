"""Snapshots, forks and filesystem-only pauses through the real SDK: `create_snapshot`,
`Sandbox.create(snapshot_id)`, `list_snapshots`, `delete_snapshot`, `fork` and
`pause(mode="filesystem")` (E2B's own tests of them, plus the errors and events Coppice answers
with). Captures are filesystem-only here."""

import os

import httpx
import pytest
from e2b import (
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
)

from support import unique, wait_until


def api(method, path, **kwargs):
    """A raw control-plane request, for what the SDK checks before sending."""
    return httpx.request(
        method,
        os.environ["E2B_API_URL"] + path,
        headers={"X-API-KEY": os.environ["E2B_API_KEY"]},
        timeout=60,
        **kwargs,
    )


@pytest.fixture
def snapshots():
    """Snapshot IDs deleted after the test, whatever it did."""
    ids = []
    yield ids
    for sid in ids:
        Sandbox.delete_snapshot(sid)


def forked(factory, forks):
    """Hands `forks` to the factory, which kills them in teardown."""
    for f in forks:
        if isinstance(f, Sandbox):
            factory.ids.append(f.sandbox_id)
    return forks


def test_snapshot_then_create_from_it_has_the_files_and_each_side_is_independent(
    factory, snapshots
):
    src = factory.create()
    src.files.make_dir("/home/user/app")
    src.files.write("/home/user/app/config.json", '{"env": "test"}')
    src.files.write("/home/user/test.txt", "content from original sandbox")
    snap = src.create_snapshot()
    snapshots.append(snap.snapshot_id)
    assert snap.snapshot_id.endswith(":default"), snap.snapshot_id
    assert snap.names == []
    # The source keeps running and keeps its files.
    assert src.is_running()
    one = factory.create(template=snap.snapshot_id)
    two = factory.create(template=snap.snapshot_id)
    assert one.files.exists("/home/user/app")
    assert one.files.read("/home/user/app/config.json") == '{"env": "test"}'
    assert two.files.read("/home/user/test.txt") == "content from original sandbox"
    # Later writes stay where they are made.
    src.files.write("/home/user/test.txt", "changed in the source")
    one.files.write("/home/user/test.txt", "changed in one")
    assert two.files.read("/home/user/test.txt") == "content from original sandbox"
    assert one.files.read("/home/user/test.txt") == "changed in one"
    assert src.files.read("/home/user/test.txt") == "changed in the source"
    # A sandbox from a snapshot runs commands as a fresh one does.
    assert one.commands.run("whoami").stdout.strip() == "user"


def test_create_snapshot_by_id_and_on_the_v1_route(factory, snapshots):
    src = factory.create()
    src.files.write("/home/user/v1.txt", "v1")
    snap = Sandbox.create_snapshot(src.sandbox_id)
    snapshots.append(snap.snapshot_id)
    # The older SDKs' create route resolves snapshot IDs too.
    r = api("POST", "/sandboxes", json={"templateID": snap.snapshot_id, "timeout": 60})
    assert r.status_code == 201, r.text
    made = r.json()["sandboxID"]
    factory.ids.append(made)
    assert Sandbox.connect(made).files.read("/home/user/v1.txt") == "v1"


def test_named_snapshots_list_and_filters(factory, snapshots):
    src = factory.create()
    other = factory.create()
    name = unique("snap")
    snap = src.create_snapshot(name=name)
    snapshots.append(snap.snapshot_id)
    assert snap.snapshot_id == f"local/{name}:default"
    assert snap.names == [f"local/{name}"]
    # A repeated name is a new build of the same snapshot, under the same ID.
    src.files.write("/home/user/second.txt", "second")
    again = src.create_snapshot(name=name)
    assert again.snapshot_id == snap.snapshot_id
    assert factory.create(template=snap.snapshot_id).files.read("/home/user/second.txt") == "second"
    unnamed = other.create_snapshot()
    snapshots.append(unnamed.snapshot_id)

    listed = [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    assert snap.snapshot_id in listed and unnamed.snapshot_id in listed
    assert listed.count(snap.snapshot_id) == 1
    by_sandbox = Sandbox.list_snapshots(sandbox_id=other.sandbox_id).next_items()
    assert [s.snapshot_id for s in by_sandbox] == [unnamed.snapshot_id]
    for asked in (name, f"local/{name}", f"{name}:default"):
        by_name = Sandbox.list_snapshots(name=asked).next_items()
        assert [s.snapshot_id for s in by_name] == [snap.snapshot_id], asked
    assert Sandbox.list_snapshots(name=f"{name}-does-not-exist").next_items() == []
    assert Sandbox.list_snapshots(name=f"{name}:v9").next_items() == []
    # The name with this gateway's namespace creates too.
    assert factory.create(template=f"local/{name}").is_running()


def test_list_pages_with_next_token(factory, snapshots):
    src = factory.create()
    for _ in range(3):
        snapshots.append(src.create_snapshot().snapshot_id)
    seen = []
    paginator = Sandbox.list_snapshots(sandbox_id=src.sandbox_id, limit=2)
    pages = 0
    while paginator.has_next:
        seen += [s.snapshot_id for s in paginator.next_items()]
        pages += 1
    assert pages == 2
    assert sorted(seen) == sorted(snapshots)
    r = api("GET", "/snapshots", params={"limit": "0"})
    assert r.status_code == 400 and "limit" in r.json()["message"]
    # Seed 002's route lists the same.
    r = api("GET", "/sandboxes/snapshots", params={"sandboxID": src.sandbox_id})
    assert r.status_code == 200
    assert sorted(s["snapshotID"] for s in r.json()) == sorted(snapshots)


def test_delete_snapshot(factory):
    src = factory.create()
    src.files.write("/home/user/kept.txt", "kept")
    snap = src.create_snapshot()
    user = factory.create(template=snap.snapshot_id)
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    # A sandbox made from it keeps its files: the layer goes only when nothing uses it.
    assert user.files.read("/home/user/kept.txt") == "kept"
    with pytest.raises(Exception, match="not found"):
        factory.create(template=snap.snapshot_id)
    assert snap.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]


def test_snapshot_errors(factory):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.create_snapshot("nosuchsandbox0000000")
    killed = factory.create()
    killed.kill()
    with pytest.raises(SandboxNotFoundException):
        killed.create_snapshot()
    src = factory.create()
    # A memory snapshot is refused, as E2B refuses a kind a node cannot take.
    with pytest.raises(SandboxException) as e:
        src.create_snapshot(mode="full")
    assert e.value.status_code == 409
    r = api("POST", f"/sandboxes/{src.sandbox_id}/snapshots", json={"memory": True})
    assert r.status_code == 409
    assert r.json()["error_code"] == "snapshot_memory_unsupported_node"
    assert "memory" in r.json()["message"]
    # A filesystem-only one is what every capture here is.
    snap = src.create_snapshot(mode="filesystem")
    Sandbox.delete_snapshot(snap.snapshot_id)
    for body, field in (
        ({"nmae": "x"}, "nmae"),
        ({"name": 5}, "invalid type"),
        ({"name": "Bad Name"}, "name"),
        ({"name": "other/snap"}, "namespace"),
    ):
        r = api("POST", f"/sandboxes/{src.sandbox_id}/snapshots", json=body)
        assert r.status_code == 400, (body, r.text)
        assert field in r.json()["message"], (body, r.text)
    r = api("POST", f"/sandboxes/{src.sandbox_id}/snapshots", json={"name": "base"})
    assert r.status_code == 409, r.text


def test_snapshot_of_a_paused_sandbox_leaves_it_paused(factory, snapshots):
    src = factory.create()
    src.files.write("/home/user/p.txt", "paused")
    src.pause()
    snap = Sandbox.create_snapshot(src.sandbox_id)
    snapshots.append(snap.snapshot_id)
    assert not src.is_running()
    assert factory.create(template=snap.snapshot_id).files.read("/home/user/p.txt") == "paused"


def test_snapshotted_event(factory, snapshots):
    src = factory.create()
    snap = src.create_snapshot()
    snapshots.append(snap.snapshot_id)

    def found():
        r = api("GET", f"/events/sandboxes/{src.sandbox_id}")
        return [
            e
            for e in r.json()
            if e["type"] == "sandbox.lifecycle.snapshotted"
            and e["eventData"]["snapshot_id"] == snap.snapshot_id
        ]

    wait_until(found, 10, "the snapshotted event")


def test_fork(factory):
    src = factory.create(timeout=120)
    src.files.write("/home/user/state.txt", "state before fork")
    before = src.get_info()
    forks = forked(factory, src.fork())
    assert len(forks) == 1
    fork = forks[0]
    assert isinstance(fork, Sandbox)
    assert fork.sandbox_id != src.sandbox_id
    assert src.is_running() and fork.is_running()
    assert fork.files.read("/home/user/state.txt") == "state before fork"
    fork.files.write("/home/user/state.txt", "modified in fork")
    assert src.files.read("/home/user/state.txt") == "state before fork"
    # The source's id and expiry are unchanged; a fork's window defaults to 15 s.
    after = src.get_info()
    assert after.end_at == before.end_at
    window = (fork.get_info().end_at - fork.get_info().started_at).total_seconds()
    assert 10 <= window <= 20, window
    assert fork.commands.run("cat /home/user/state.txt").stdout == "modified in fork"


def test_fork_multiple_and_by_id(factory):
    src = factory.create()
    forks = forked(factory, src.fork(count=2, timeout=60))
    assert len(forks) == 2
    assert all(isinstance(f, Sandbox) for f in forks)
    ids = {f.sandbox_id for f in forks}
    assert len(ids) == 2 and src.sandbox_id not in ids
    for f in forks:
        assert f.is_running()
    by_id = forked(factory, Sandbox.fork(src.sandbox_id))
    assert len(by_id) == 1 and by_id[0].is_running()

    def created_events():
        r = api("GET", f"/events/sandboxes/{by_id[0].sandbox_id}")
        return [
            e
            for e in r.json()
            if e["type"] == "sandbox.lifecycle.created"
            and e["eventData"].get("forkedFrom") == src.sandbox_id
        ]

    wait_until(created_events, 10, "the fork's created event")


def test_fork_errors(factory):
    with pytest.raises(InvalidArgumentException):
        Sandbox.fork("sbx-test", count=0)
    killed = factory.create()
    killed.kill()
    with pytest.raises(SandboxNotFoundException):
        killed.fork()
    src = factory.create()
    for body, field in (({"count": 0}, "count"), ({"count": 101}, "count"), ({"cuont": 1}, "cuont")):
        r = api("POST", f"/sandboxes/{src.sandbox_id}/fork", json=body)
        assert r.status_code == 400, r.text
        assert field in r.json()["message"]
    src.pause()
    r = api("POST", f"/sandboxes/{src.sandbox_id}/fork", json={})
    assert r.status_code == 409, r.text


def pause_mode(sandbox_id):
    return api("GET", f"/sandboxes/{sandbox_id}").json().get("pauseMode")


def test_pause_filesystem_only_boots_again_on_the_same_files(factory):
    sbx = factory.create()
    sbx.files.write("/home/user/fs-only-marker.txt", "persisted")
    sbx.commands.run("sleep 1000", background=True)
    assert sbx.pause(keep_memory=False)
    assert not sbx.is_running()
    assert pause_mode(sbx.sandbox_id) == "filesystem"
    # Paused twice: the SDK's False for a 409.
    assert Sandbox.pause(sbx.sandbox_id, mode="filesystem") is False
    # Its network can change while it has none: the next boot applies it.
    r = api("PUT", f"/sandboxes/{sbx.sandbox_id}/network", json={"denyOut": ["0.0.0.0/0"]})
    assert r.status_code == 204, r.text
    resumed = sbx.connect()
    assert api("GET", f"/sandboxes/{sbx.sandbox_id}").json()["network"]["denyOut"] == ["0.0.0.0/0"]
    assert resumed.is_running() and resumed.sandbox_id == sbx.sandbox_id
    assert pause_mode(sbx.sandbox_id) is None
    # Same files and credentials, fresh processes.
    assert resumed.files.read("/home/user/fs-only-marker.txt").strip() == "persisted"
    assert resumed.commands.run("pgrep -c sleep || true").stdout.strip() == "0"
    # A full pause is reported as one.
    sbx.pause()
    assert pause_mode(sbx.sandbox_id) == "full"


def test_auto_pause_filesystem_only_and_auto_resume_refuses_it(factory):
    sbx = factory.create(
        timeout=60, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}
    )
    sbx.files.write("/home/user/before-timeout.txt", "kept")
    sbx.set_timeout(1)
    wait_until(
        lambda: pause_mode(sbx.sandbox_id) == "filesystem",
        timeout=15,
        what="the timed-out sandbox to be paused filesystem-only",
    )
    assert Sandbox.connect(sbx.sandbox_id).files.read("/home/user/before-timeout.txt") == "kept"
    # E2B refuses the combination, and traffic never boots a sandbox paused this way.
    r = api(
        "POST",
        "/v2/sandboxes",
        json={"templateID": "base", "autoPause": True, "autoPauseMemory": False,
              "autoResume": {"enabled": True}},
    )
    assert r.status_code == 400 and "autoPauseMemory" in r.json()["message"], r.text
    woken = factory.create(lifecycle={"on_timeout": "pause", "auto_resume": True})
    woken.pause(mode="filesystem")
    with pytest.raises(SandboxNotRunningException):
        woken.files.read("/etc/hostname")
    assert pause_mode(woken.sandbox_id) == "filesystem"


def test_connect_with_reboot_boots_a_full_pause_again_on_its_files(factory):
    sbx = factory.create()
    sbx.files.write("/home/user/kept.txt", "kept")
    sbx.commands.run("sleep 1000", background=True)
    # On a running sandbox it changes nothing.
    Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
    assert sbx.commands.run("pgrep -c sleep").stdout.strip() == "1"
    sbx.pause()
    assert pause_mode(sbx.sandbox_id) == "full"
    resumed = Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
    assert resumed.files.read("/home/user/kept.txt") == "kept"
    assert resumed.commands.run("pgrep -c sleep || true").stdout.strip() == "0"
