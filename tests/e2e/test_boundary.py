"""The sandbox boundary through the real SDK (issue 18, item 6): file operations run as the
requesting user, so `user` cannot read or write root's files by any path, and root inside
the sandbox cannot trace, stop or signal the agent (docs/envd.md, docs/backends.md)."""

import pytest
from e2b import SandboxException


@pytest.fixture(scope="module")
def sbx(module_factory):
    return module_factory.create()


def refused(call):
    """The SDK's error for a refused file operation, with envd's 'permission denied'."""
    with pytest.raises(SandboxException) as info:
        call()
    assert "permission denied" in str(info.value), info.value
    return info.value


def test_user_cannot_read_or_write_roots_files(sbx):
    refused(lambda: sbx.files.read("/etc/shadow"))
    refused(lambda: sbx.files.write("/etc/cron.d/x", "* * * * * root id\n"))
    refused(lambda: sbx.files.write("/etc/passwd", "pwned\n"))
    assert not sbx.files.exists("/etc/cron.d/x", user="root")
    assert sbx.files.read("/etc/passwd", user="root").startswith("root:")
    # The same paths through `..` and through a symlink the user owns.
    refused(lambda: sbx.files.read("../../etc/shadow"))
    sbx.commands.run("ln -sf /etc/shadow /home/user/shadow-link")
    refused(lambda: sbx.files.read("/home/user/shadow-link"))
    refused(lambda: sbx.files.write("/home/user/shadow-link", "pwned"))


def test_user_cannot_list_change_or_watch_roots_directories(sbx):
    refused(lambda: sbx.files.list("/root"))
    refused(lambda: sbx.files.remove("/etc/hostname"))
    refused(lambda: sbx.files.rename("/etc/hosts", "/home/user/hosts"))
    refused(lambda: sbx.files.make_dir("/etc/new-dir"))
    refused(lambda: sbx.files.watch_dir("/root"))
    assert sbx.files.exists("/etc/hostname", user="root")
    assert sbx.files.exists("/etc/hosts", user="root")


def test_root_keeps_every_right_and_users_own_what_they_make(sbx):
    assert sbx.files.read("/etc/shadow", user="root").startswith("root:")
    sbx.files.write("/etc/cron.d/e2e", "# ok\n", user="root")
    assert sbx.files.get_info("/etc/cron.d/e2e", user="root").owner == "root"
    sbx.files.remove("/etc/cron.d/e2e", user="root")
    sbx.files.write("/home/user/made/a.txt", "hi")
    assert sbx.files.get_info("/home/user/made").owner == "user"
    assert sbx.files.get_info("/home/user/made/a.txt").owner == "user"
    assert sbx.files.read("/home/user/made/a.txt") == "hi"


ATTACKS = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
r = libc.ptrace(16, 1, None, None)
print("ptrace", r, errno.errorcode.get(ctypes.get_errno()))
try:
    open("/proc/1/mem", "r+b")
    print("mem ok")
except OSError as e:
    print("mem", errno.errorcode[e.errno])
"""


def test_root_inside_cannot_trace_stop_or_signal_the_agent(sbx):
    script = ATTACKS.replace("'", "'\\''")
    out = sbx.commands.run(f"python3 -c '{script}'", user="root").stdout.split("\n")
    assert out[0] == "ptrace -1 EPERM", out
    assert out[1] in ("mem EACCES", "mem EPERM"), out
    sbx.commands.run("kill -STOP 1; kill -TERM 1; kill -KILL 1; kill -1 -1; true", user="root")
    # The agent still answers, at once.
    assert sbx.commands.run("echo alive", timeout=10).stdout == "alive\n"
