"""The base template through the Python SDK: what E2B's base image gives its users.

The JS suite (`tests/e2e-js/sdk.test.mjs`) checks the same through the JS SDK, and
coppice-jail's `tests/template.rs` inside a sandbox without the gateway.
"""

import re

import pytest

from support import unique

# Each command E2B's base image has, and what its output starts with.
VERSIONS = {
    "git --version": r"git version 2\.",
    "curl --version": r"curl 7\.",
    "wget --version": r"GNU Wget 1\.",
    "python --version": r"Python 3\.11\.",
    "python3 --version": r"Python 3\.11\.",
    "pip --version": r"pip \d+.*python 3\.11",
    "node --version": r"v\d+\.",
    "npm --version": r"\d+\.\d+\.\d+",
    "gcc --version": r"gcc ",
    "make --version": r"GNU Make ",
    "sudo --version": r"Sudo version ",
    "ps --version": r"ps from procps-ng ",
    "gh --version": r"gh version ",
}


@pytest.mark.parametrize("command", sorted(VERSIONS))
def test_base_image_command(sandbox, command):
    result = sandbox.commands.run(command)
    assert result.exit_code == 0
    assert re.match(VERSIONS[command], result.stdout), result.stdout


def test_user_sudo_and_login_environment(sandbox):
    run = sandbox.commands.run
    assert run("whoami").stdout == "user\n"
    assert run("echo $HOME $SHELL $LANG").stdout == "/home/user /bin/bash C.UTF-8\n"
    assert "sudo" in run("id -nG").stdout.split()
    assert run("sudo -n whoami").stdout == "root\n"


def test_pip_installs_a_local_package_as_user(sandbox):
    d = f"/home/user/{unique('pkg')}"
    sandbox.files.write(
        f"{d}/pyproject.toml",
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "coppice_probe_py"\nversion = "0.1"\n',
    )
    sandbox.files.write(f"{d}/coppice_probe_py.py", "ANSWER = 42\n")
    # No network in a test: no index, and the build backend that is already installed.
    sandbox.commands.run(f"pip install --no-index --no-build-isolation {d}")
    out = sandbox.commands.run(
        'python -c "import coppice_probe_py; print(coppice_probe_py.ANSWER)"'
    )
    assert out.stdout == "42\n"


def test_c_program_compiles_and_runs(sandbox):
    d = f"/home/user/{unique('cc')}"
    sandbox.files.write(
        f"{d}/hello.c",
        '#include <stdio.h>\nint main(void) { printf("hello %d\\n", 6 * 7); return 0; }\n',
    )
    out = sandbox.commands.run(f"cd {d} && cc -o hello hello.c && ./hello")
    assert out.stdout == "hello 42\n"
