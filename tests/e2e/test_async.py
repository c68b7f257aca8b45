"""Representative flows through the async SDK (`AsyncSandbox`), whose transports differ from
the sync ones: the directory watch is a server stream here, not polling (§6 item 18)."""

import asyncio
import time

import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FilesystemEventType,
    SandboxNotRunningException,
    SandboxState,
)
from e2b_code_interpreter import AsyncSandbox as AsyncCodeInterpreter

from support import unique


async def eventually(probe, timeout: float, what: str):
    """`support.wait_until` for coroutines: polls `probe()` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_async_commands_files_and_kill(factory):
    async def flow():
        sbx = await factory.acreate(metadata={"flavour": "async"})
        info = await sbx.get_info()
        assert info.state == SandboxState.RUNNING
        assert info.metadata["flavour"] == "async"

        result = await sbx.commands.run("echo hi; echo err >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "err\n", 0)
        with pytest.raises(CommandExitException) as caught:
            await sbx.commands.run("exit 5")
        assert caught.value.exit_code == 5

        chunks = []
        await sbx.commands.run(
            "for i in 1 2 3; do echo $i; sleep 0.3; done", on_stdout=chunks.append
        )
        assert "".join(chunks) == "1\n2\n3\n"
        assert len(chunks) >= 3

        await sbx.files.write("/home/user/async.txt", "from async")
        assert await sbx.files.read("/home/user/async.txt") == "from async"
        assert [e.name for e in await sbx.files.list("/home/user") if e.name == "async.txt"]

        assert await sbx.is_running() is True
        assert await sbx.kill() is True
        assert await sbx.is_running() is False
        with pytest.raises(SandboxNotRunningException):
            await sbx.commands.run("echo hi")

    asyncio.run(flow())


def test_async_background_and_stdin(factory):
    async def flow():
        sbx = await factory.acreate()
        handle = await sbx.commands.run("cat", background=True, stdin=True)
        await sbx.commands.send_stdin(handle.pid, "async input\n")
        await sbx.commands.close_stdin(handle.pid)
        assert (await handle.wait()).stdout == "async input\n"

        sleeper = await sbx.commands.run("sleep 100", background=True)
        assert sleeper.pid in {p.pid for p in await sbx.commands.list()}
        assert await sleeper.kill() is True
        with pytest.raises(CommandExitException):
            await sleeper.wait()

    asyncio.run(flow())


def test_async_watch_dir_stream(factory):
    async def flow():
        sbx = await factory.acreate()
        root = f"/home/user/{unique('watch')}"
        await sbx.files.make_dir(f"{root}/sub")
        events = []
        handle = await sbx.files.watch_dir(root, on_event=events.append, recursive=True)
        try:
            await sbx.files.write(f"{root}/top.txt", "t")
            await sbx.files.write(f"{root}/sub/deep.txt", "d")
            await sbx.files.remove(f"{root}/top.txt")

            def seen():
                got = {(e.name, e.type) for e in events}
                return {
                    ("top.txt", FilesystemEventType.CREATE),
                    ("top.txt", FilesystemEventType.REMOVE),
                    ("sub/deep.txt", FilesystemEventType.CREATE),
                } <= got

            await eventually(seen, timeout=10, what=f"watch events, have {events}")
        finally:
            await handle.stop()

    asyncio.run(flow())


def test_async_pause_and_connect(factory):
    async def flow():
        sbx = await factory.acreate()
        await sbx.files.write("/home/user/kept.txt", "kept")
        assert await sbx.pause() is True
        assert (await AsyncSandbox.get_info(sbx.sandbox_id)).state == SandboxState.PAUSED
        resumed = await AsyncSandbox.connect(sbx.sandbox_id)
        assert await resumed.files.read("/home/user/kept.txt") == "kept"

    asyncio.run(flow())


def test_async_code_interpreter(factory):
    async def flow():
        sbx = await factory.acreate(cls=AsyncCodeInterpreter)
        await sbx.run_code("y = 20")
        execution = await sbx.run_code("y * 2 + 2")
        assert execution.text == "42"
        lines = []
        await sbx.run_code("print('streamed')", on_stdout=lambda m: lines.append(m.line))
        assert lines == ["streamed\n"]
        ctx = await sbx.create_code_context(cwd="/tmp")
        assert (await sbx.run_code("import os; os.getcwd()", context=ctx)).text == "/tmp"
        await sbx.remove_code_context(ctx)

    asyncio.run(flow())
