"""`sbx.commands`: envd's process service through the gateway (spec §6 items 3-12)."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    SandboxNotRunningException,
    TimeoutException,
)

from support import unique, wait_until

# A pid no process can have: Linux pids stay below 2^22.
NO_SUCH_PID = 2**22 + 7


def command_lines(sbx):
    """The `bash -c` command line of every process envd lists."""
    return {p.pid: " ".join(p.args) for p in sbx.commands.list()}


def test_echo(sandbox):
    result = sandbox.commands.run("echo hi")
    assert result.stdout == "hi\n"
    assert result.stderr == ""
    assert result.exit_code == 0


def test_nonzero_exit_raises_with_output(sandbox):
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo out; echo err >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "out\n"
    assert caught.value.stderr == "err\n"


def test_envs_request_and_sandbox_level(sandbox):
    run = sandbox.commands.run
    assert run("echo $E2E_GLOBAL").stdout == "global\n"
    assert run("echo $FOO", envs={"FOO": "x"}).stdout == "x\n"
    assert (
        run("echo $E2E_OVERRIDE", envs={"E2E_OVERRIDE": "request"}).stdout
        == "request\n"
    )
    # Request envs belong to that one command.
    assert run("echo ${FOO:-unset} $E2E_OVERRIDE").stdout == "unset global\n"


def test_cwd_and_user(sandbox):
    run = sandbox.commands.run
    assert run("pwd").stdout == "/home/user\n"
    assert run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert run("whoami").stdout == "user\n"
    assert run("whoami", user="root").stdout == "root\n"
    assert run("echo $HOME", user="root").stdout == "/root\n"


def test_missing_cwd_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd="/no/such/dir")


def test_timeout_ends_the_command(sandbox):
    marker = unique("timeout")
    started = time.monotonic()
    with pytest.raises(TimeoutException) as caught:
        sandbox.commands.run(f"sleep 30; echo {marker}", timeout=1)
    elapsed = time.monotonic() - started
    # Not the "sandbox is gone" subclass: the sandbox is fine, the command timed out.
    assert not isinstance(caught.value, SandboxNotRunningException)
    assert elapsed < 10, f"a 1 s timeout took {elapsed:.1f} s to fire"
    # The command's lifetime ends with the timeout: it must not keep running.
    wait_until(
        lambda: not any(marker in line for line in command_lines(sandbox).values()),
        timeout=5,
        what="the timed-out command to disappear from commands.list()",
    )
    # And the sandbox still works.
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


def test_on_stdout_streams_while_running(sandbox):
    started = time.monotonic()
    chunks = []
    errors = []
    result = sandbox.commands.run(
        "for i in 1 2 3; do echo line$i; echo e$i >&2; sleep 0.5; done",
        on_stdout=lambda s: chunks.append((time.monotonic() - started, s)),
        on_stderr=errors.append,
    )
    finished = time.monotonic() - started
    assert "".join(s for _, s in chunks) == "line1\nline2\nline3\n"
    assert result.stdout == "line1\nline2\nline3\n"
    assert "".join(errors) == "e1\ne2\ne3\n"
    assert len(chunks) >= 3, f"output arrived in {len(chunks)} piece(s): {chunks}"
    first_at = chunks[0][0]
    assert finished - first_at > 0.8, (
        f"first output arrived at {first_at:.2f} s, the command ended at "
        f"{finished:.2f} s: output is buffered, not streamed"
    )


def test_background_list_and_kill(sandbox):
    handle = sandbox.commands.run("sleep 100", background=True)
    listed = command_lines(sandbox)
    assert handle.pid in listed
    assert "sleep 100" in listed[handle.pid]
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as caught:
        handle.wait()
    assert caught.value.exit_code == -1
    wait_until(
        lambda: handle.pid not in command_lines(sandbox),
        timeout=5,
        what="the killed command to leave commands.list()",
    )
    assert sandbox.commands.kill(NO_SUCH_PID) is False


def test_kill_by_pid(sandbox):
    handle = sandbox.commands.run("sleep 100", background=True)
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()


def test_stdin_send_and_close(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    handle.send_stdin("hello ")
    sandbox.commands.send_stdin(handle.pid, b"world\n")
    handle.close_stdin()
    assert handle.wait().stdout == "hello world\n"


def test_stream_input(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, iter(["a", b"b", "c\n"]))
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "abc\n"


def test_without_stdin_reads_eof(sandbox):
    # stdin=False (the default) must not leave `cat` waiting for input forever.
    assert sandbox.commands.run("cat", timeout=10).stdout == ""


def test_disconnect_then_connect(sandbox):
    flag = f"/tmp/{unique('go')}"
    handle = sandbox.commands.run(
        f"while [ ! -e {flag} ]; do sleep 0.05; done; echo after; exit 4",
        background=True,
    )
    handle.disconnect()
    # Disconnecting must not kill the command.
    assert handle.pid in command_lines(sandbox)
    again = sandbox.commands.connect(handle.pid)
    sandbox.commands.run(f"touch {flag}")
    with pytest.raises(CommandExitException) as caught:
        again.wait()
    assert caught.value.exit_code == 4
    assert "after\n" in caught.value.stdout


def test_large_output_is_exact(sandbox):
    # About 2.7 MB over many 32 KiB chunks: nothing lost, duplicated or reordered.
    result = sandbox.commands.run("seq 1 400000", timeout=30)
    expected = "".join(f"{i}\n" for i in range(1, 400001))
    assert len(result.stdout) == len(expected)
    assert result.stdout == expected
    # The same on stderr.
    result = sandbox.commands.run("seq 1 100000 >&2", timeout=30)
    assert result.stderr == "".join(f"{i}\n" for i in range(1, 100001))


def test_multibyte_output_across_chunks(sandbox):
    # 3-byte characters: 32 KiB chunk boundaries fall inside them.
    result = sandbox.commands.run(
        "python3 -c \"import sys; sys.stdout.write('\\u20ac' * 100000)\"", timeout=30
    )
    assert result.stdout == "\u20ac" * 100000


def test_invalid_utf8_output(sandbox):
    result = sandbox.commands.run("printf 'a\\xffb'")
    assert result.stdout == "a\ufffdb"


def test_concurrent_commands_run_in_parallel(sandbox):
    # Eight one-second commands at once, each on its own stream through the gateway.
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(
            pool.map(
                lambda i: sandbox.commands.run(f"sleep 1; echo {i}").stdout, range(8)
            )
        )
    elapsed = time.monotonic() - started
    assert outs == [f"{i}\n" for i in range(8)]
    assert elapsed < 4, f"8 parallel 1 s commands took {elapsed:.1f} s: streams serialised"
