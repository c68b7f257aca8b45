"""`e2b_code_interpreter.Sandbox` in every language E2B's code interpreter offers beside
python: javascript, typescript, r and java (issue 15 items 3 and 4), and the default
contexts `list_code_contexts()` shows. The checks mirror e2b-dev/code-interpreter's own
tests (test_default_kernels, test_cwd, env_vars/*)."""

import pytest
from e2b_code_interpreter import Sandbox as CodeInterpreter

from support import unique


def test_a_fresh_sandbox_lists_the_default_contexts(factory):
    sandbox = factory.create(cls=CodeInterpreter)
    contexts = sandbox.list_code_contexts()
    assert [(c.language, c.cwd) for c in contexts] == [
        ("python", "/home/user"),
        ("javascript", "/home/user"),
    ]
    # The listed javascript context is the one `language="js"` runs in.
    sandbox.run_code("globalThis.e2eMark = 'here'", language="js")
    js = next(c for c in contexts if c.language == "javascript")
    assert sandbox.run_code("e2eMark", context=js).text == "here"


def test_javascript_hello_esm_import_and_top_level_await(interpreter):
    execution = interpreter.run_code("console.log('Hello World!')", language="js")
    assert execution.error is None, execution.error
    assert execution.logs.stdout == ["Hello World!\n"]

    execution = interpreter.run_code(
        """
    import { readFileSync } from 'fs'
    console.log(typeof readFileSync)
    """,
        language="js",
    )
    assert execution.logs.stdout == ["function\n"]

    name = unique("e2e-mod") + ".mjs"
    interpreter.files.write(f"/home/user/{name}", "export const answer = 42;\n")
    execution = interpreter.run_code(
        f"import {{ answer }} from './{name}'\nanswer", language="js"
    )
    assert execution.error is None, execution.error
    assert execution.text == "42"

    execution = interpreter.run_code(
        """
    await Promise.resolve('Hello World!')
    """,
        language="js",
    )
    assert execution.text == "Hello World!"

    interpreter.run_code("const kept = 20", language="js")
    assert interpreter.run_code("kept + 1", language="js").text == "21"


def test_typescript_hello(interpreter):
    execution = interpreter.run_code(
        "const message: string = 'Hello, World!'; console.log(message)", language="ts"
    )
    assert execution.error is None, execution.error
    assert execution.logs.stdout == ["Hello, World!\n"]


def test_r_hello(interpreter):
    execution = interpreter.run_code('print("Hello, World!")', language="r")
    assert execution.error is None, execution.error
    assert execution.logs.stdout == ['[1] "Hello, World!"\n']


def test_java_hello(interpreter):
    execution = interpreter.run_code(
        'System.out.println("Hello, World!")', language="java"
    )
    assert execution.error is None, execution.error
    assert execution.logs.stdout[0] == "Hello, World!"


# How each language reads an env var, and how its value comes back.
READ_ENV = {
    "js": ("process.env.{name} || 'default'", lambda v: v),
    "ts": ("process.env.{name} || 'default'", lambda v: v),
    "r": ("Sys.getenv('{name}', unset = 'default')", lambda v: f'[1] "{v}"'),
    "java": ('System.getProperty("{name}", "default")', lambda v: v),
}

# How each language shows its working directory.
READ_CWD = {
    "js": ("process.cwd()", lambda d: d),
    "ts": ("process.cwd()", lambda d: d),
    "r": ("getwd()", lambda d: f'[1] "{d}"'),
    "java": ('System.getProperty("user.dir")', lambda d: d),
}


def first_text(execution):
    assert execution.error is None, execution.error
    assert execution.results, execution
    return execution.results[0].text.strip()


@pytest.mark.parametrize("language", ["js", "ts", "r", "java"])
def test_env_vars_per_run_and_from_the_sandbox(interpreter, language):
    code, shown = READ_ENV[language]
    per_run = interpreter.run_code(
        code.format(name="E2E_FOO"), language=language, envs={"E2E_FOO": "bar"}
    )
    assert first_text(per_run) == shown("bar")
    after = interpreter.run_code(code.format(name="E2E_FOO"), language=language)
    assert first_text(after) == shown("default")
    sandbox_level = interpreter.run_code(
        code.format(name="E2E_SANDBOX_LEVEL"), language=language
    )
    assert first_text(sandbox_level) == shown("from-create")


@pytest.mark.parametrize("language", ["js", "ts", "r", "java"])
def test_cwd_default_and_per_context(interpreter, language):
    code, shown = READ_CWD[language]
    default = interpreter.run_code(code, language=language)
    assert first_text(default) == shown("/home/user")
    context = interpreter.create_code_context(language=language, cwd="/tmp")
    try:
        assert context.cwd == "/tmp"
        assert first_text(interpreter.run_code(code, context=context)) == shown("/tmp")
    finally:
        interpreter.remove_code_context(context.id)


def test_a_context_can_start_in_root_home(interpreter):
    # E2B's kernels run as root, so /root is a working directory like any other.
    context = interpreter.create_code_context(language="python", cwd="/root")
    try:
        execution = interpreter.run_code(
            "import os; (os.getcwd(), os.getuid())", context=context
        )
        assert execution.error is None, execution.error
        assert execution.text == "('/root', 0)"
        contexts = interpreter.list_code_contexts()
        assert contexts[-1].id == context.id
        assert contexts[-1].cwd == "/root"
    finally:
        interpreter.remove_code_context(context.id)
