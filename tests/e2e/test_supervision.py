"""Supervision inside a code-interpreter sandbox, through the real SDK: what E2B's
`test_systemd` does (kill the interpreter's processes from inside as root, wait for health on
port 49999 inside the sandbox, run code), a memory hog in a cell and in a command, which
must end with a clear error while the sandbox lives on (docs/code-interpreter.md,
"Supervision"), and the `task.completed` webhook of a background command (docs/events.md)."""

import json
import os
import time
import urllib.request

import pytest
from e2b import CommandExitException, SandboxState
from e2b_code_interpreter import Sandbox as CodeInterpreter

from support import unique, wait_until

# E2B's test asks curl; python3 is in every template that has a code interpreter.
HEALTH = (
    "python3 -c \"import urllib.request as u; "
    "print(u.urlopen('http://0.0.0.0:49999/health', timeout=5).status)\""
)

# Appends 100 MiB blocks until something stops it (the memory hog).
HOG = "x = []\nwhile True:\n    x.append(bytearray(100 * 1024 * 1024))\n"


def wait_for_health(sbx, tries=10, interval=0.1):
    """E2B's `wait_for_health`, against the interpreter's port inside the sandbox."""
    for _ in range(tries):
        try:
            if sbx.commands.run(HEALTH).stdout.strip() == "200":
                return True
        except Exception:  # noqa: BLE001 - as E2B's helper: any failure is "not yet"
            pass
        time.sleep(interval)
    return False


@pytest.fixture
def ci(factory) -> CodeInterpreter:
    return factory.create(cls=CodeInterpreter)


def test_the_interpreter_answers_health_inside_the_sandbox(ci):
    assert wait_for_health(ci)


def test_kernels_killed_from_inside_come_back(ci):
    assert ci.run_code("state = 1").error is None
    assert wait_for_health(ci)
    # Every python kernel, as killing E2B's Jupyter server takes every kernel with it.
    killed = ci.commands.run("pkill -9 -f '[d]river.py' && echo killed", user="root")
    assert killed.stdout == "killed\n"
    assert wait_for_health(ci, 60, 0.5)
    result = ci.run_code("x = 1; x")
    assert result.error is None
    assert result.text == "1"
    # A fresh kernel: the old state is gone.
    assert ci.run_code("state").error.name == "NameError"


def test_e2b_systemd_kills_leave_the_sandbox_working(ci):
    # E2B's test_systemd commands, verbatim: here (as on E2B) the pattern matches the
    # shell that runs them, which kills itself.
    assert wait_for_health(ci)
    for line in (
        "kill -9 $(pgrep -f 'jupyter server')",
        "kill -9 $(pgrep -f 'uvicorn main:app')",
    ):
        try:
            ci.commands.run(line, user="root")
        except Exception:  # noqa: BLE001 - E2B's test ignores this too
            pass
        assert wait_for_health(ci, 60, 0.5)
        assert ci.run_code("x = 1; x").text == "1"


def test_root_cannot_stop_the_agent(ci):
    ci.commands.run("kill -TERM 1; kill -INT 1; kill -KILL 1; true", user="root")
    time.sleep(0.5)
    assert ci.is_running()
    assert ci.run_code("x = 1; x").text == "1"
    assert ci.commands.run("echo alive").stdout == "alive\n"


def test_a_memory_hog_ends_with_an_error_and_the_sandbox_lives(ci):
    other = ci.create_code_context()
    assert ci.run_code("mine = 1", context=other).error is None

    # In a cell: the cell's kernel is killed, the execution says why.
    execution = ci.run_code(HOG, timeout=180)
    assert execution.error is not None
    assert execution.error.name == "ContextRestarting"
    assert "out-of-memory" in execution.error.value
    # The default context starts afresh; the other context kept its state.
    assert ci.run_code("x = 1; x").text == "1"
    assert ci.run_code("mine + 1", context=other).text == "2"

    # In a command: the command is killed (SIGKILL), nothing else.
    with pytest.raises(CommandExitException) as failed:
        ci.commands.run(f"python3 -c '{HOG}'", timeout=180)
    assert failed.value.exit_code != 0

    assert ci.is_running()
    assert ci.get_info().state == SandboxState.RUNNING
    assert ci.commands.run("echo alive").stdout == "alive\n"


class _Receiver:
    """A webhook receiver on 127.0.0.1 in this process: keeps every JSON body POSTed."""

    def __init__(self):
        import http.server
        import threading

        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _api(method, path, body=None):
    """A call to the gateway's events API, authenticated as the SDK is."""
    req = urllib.request.Request(
        os.environ["E2B_API_URL"].rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "X-API-Key": os.environ["E2B_API_KEY"],
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def test_a_background_command_is_announced_by_a_task_completed_webhook(factory):
    """What an agent waiting for `npm install` would do: start it in the background, get
    the webhook when it ends, with its exit code (the gateway allows loopback receivers in
    this suite: `cargo xtask e2e` passes `--webhook-allow 127.0.0.0/8`)."""
    receiver = _Receiver()
    hook = _api(
        "POST",
        "/events/webhooks",
        {
            "name": unique("task-completed"),
            "url": receiver.url,
            "events": ["task.completed"],
            "signatureSecret": "e2e-secret",
        },
    )
    try:
        sbx = factory.create()
        handle = sbx.commands.run("sleep 1; exit 3", background=True)

        def arrived():
            return [
                b
                for b in receiver.bodies
                if b["sandboxId"] == sbx.sandbox_id
                and b["eventData"]["pid"] == handle.pid
            ]

        got = wait_until(arrived, 60, "the task.completed webhook")
        event = got[0]
        assert event["type"] == "task.completed"
        data = event["eventData"]
        assert data["exit_code"] == 3
        assert data["command"] == "/bin/bash -l -c sleep 1; exit 3"
        assert data["killed"] is False
        assert data["duration_seconds"] >= 1
        with pytest.raises(CommandExitException) as failed:
            handle.wait()
        assert failed.value.exit_code == 3
    finally:
        _api("DELETE", f"/events/webhooks/{hook['id']}")
        receiver.close()
