"""`e2b_code_interpreter.Sandbox` (template `code-interpreter-v1`): port 49999 through the
gateway (§6 items 28-30, 32, 34)."""

import time

import pytest
from e2b import NotFoundException, TimeoutException

from support import unique


def test_state_is_kept_between_runs(interpreter):
    name = unique("x").replace("-", "_")
    assert interpreter.run_code(f"{name} = 1").error is None
    execution = interpreter.run_code(f"{name} + 1")
    assert execution.error is None
    assert execution.text == "2"


def test_stdout_error_and_execution_count(interpreter):
    first = interpreter.run_code("print('a')")
    assert first.logs.stdout == ["a\n"]
    assert first.logs.stderr == []
    assert first.error is None

    failed = interpreter.run_code("raise ValueError('bad')")
    assert failed.error is not None
    assert failed.error.name == "ValueError"
    assert failed.error.value == "bad"
    assert "ValueError" in failed.error.traceback
    assert failed.execution_count == first.execution_count + 1

    streamed = []
    interpreter.run_code(
        "import sys; print('out'); print('err', file=sys.stderr)",
        on_stdout=lambda m: streamed.append(("out", m.line)),
        on_stderr=lambda m: streamed.append(("err", m.line)),
    )
    assert ("out", "out\n") in streamed
    assert ("err", "err\n") in streamed


def test_libraries_of_the_template(interpreter):
    execution = interpreter.run_code(
        "import numpy, pandas, matplotlib\n"
        "int(numpy.arange(5).sum()) + len(pandas.DataFrame({'a': [1, 2]}))"
    )
    assert execution.error is None, execution.error
    assert execution.text == "12"


def test_envs_per_run_and_sandbox_level(interpreter):
    read = "import os; os.environ.get('E2E_PER_RUN', 'unset')"
    assert interpreter.run_code(read, envs={"E2E_PER_RUN": "set"}).text == "set"
    # Per-run variables do not outlive the run.
    assert interpreter.run_code(read).text == "unset"
    # Variables given at create are visible in the kernel.
    sandbox_level = interpreter.run_code("import os; os.environ['E2E_SANDBOX_LEVEL']")
    assert sandbox_level.text == "from-create"


def test_contexts(interpreter):
    ctx = interpreter.create_code_context(cwd="/tmp")
    assert ctx.cwd == "/tmp"
    assert ctx.language == "python"
    assert interpreter.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    assert ctx.id in {c.id for c in interpreter.list_code_contexts()}

    # A context has its own state.
    interpreter.run_code("only_here = 42", context=ctx)
    assert interpreter.run_code("only_here", context=ctx).text == "42"
    assert interpreter.run_code("only_here").error.name == "NameError"

    # Restart clears it.
    interpreter.restart_code_context(ctx)
    assert interpreter.run_code("only_here", context=ctx).error.name == "NameError"

    interpreter.remove_code_context(ctx)
    assert ctx.id not in {c.id for c in interpreter.list_code_contexts()}
    with pytest.raises(NotFoundException):
        interpreter.run_code("1", context=ctx)


def test_unknown_context(interpreter):
    with pytest.raises(NotFoundException):
        interpreter.restart_code_context("e2e-no-such-context")
    with pytest.raises(NotFoundException):
        interpreter.remove_code_context("e2e-no-such-context")


def test_timeout_interrupts_and_context_survives(interpreter):
    ctx = interpreter.create_code_context()
    interpreter.run_code("kept = 'yes'", context=ctx)
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        interpreter.run_code("import time; time.sleep(30)", context=ctx, timeout=2)
    assert time.monotonic() - started < 10
    # The interrupted cell must not block the context: the next run starts at once and
    # sees the earlier state.
    started = time.monotonic()
    execution = interpreter.run_code("kept", context=ctx, timeout=20)
    assert execution.text == "yes"
    assert time.monotonic() - started < 10, "the timed-out cell kept the context busy"
    interpreter.remove_code_context(ctx)
