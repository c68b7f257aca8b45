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


# --- IPython semantics (issue 15 item 2): the template runs cells in IPython -----------


def test_indented_cell_and_shell_escape(interpreter):
    execution = interpreter.run_code(
        """
        a = 20
        a + 1
        """
    )
    assert execution.error is None, execution.error
    assert execution.text == "21"
    pwd = interpreter.run_code("!pwd")
    assert pwd.error is None, pwd.error
    assert "".join(pwd.logs.stdout).strip() == "/home/user"


def test_magics(interpreter):
    ctx = interpreter.create_code_context()
    env = interpreter.run_code(
        "%env E2E_MAGIC=on\nimport os\nos.environ['E2E_MAGIC']", context=ctx
    )
    assert env.text == "on", env
    bash = interpreter.run_code("%%bash\necho \"bash $E2E_MAGIC\"", context=ctx)
    assert bash.error is None, bash.error
    assert bash.logs.stdout == ["bash on\n"]
    cd = interpreter.run_code("%cd /tmp\nimport os\nos.getcwd()", context=ctx)
    assert cd.text == "/tmp"
    interpreter.remove_code_context(ctx)


def test_pip_install_of_a_wheel_built_in_the_sandbox(interpreter):
    ctx = interpreter.create_code_context()
    build = interpreter.run_code(
        "import os, zipfile\n"
        "whl = '/tmp/e2edemo-0.1-py3-none-any.whl'\n"
        "info = 'e2edemo-0.1.dist-info/'\n"
        "with zipfile.ZipFile(whl, 'w') as z:\n"
        "    z.writestr('e2edemo/__init__.py', 'VALUE = 42\\n')\n"
        "    z.writestr(info + 'METADATA', 'Metadata-Version: 2.1\\nName: e2edemo\\nVersion: 0.1\\n')\n"
        "    z.writestr(info + 'WHEEL', 'Wheel-Version: 1.0\\nGenerator: e2e\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n"
        "    z.writestr(info + 'RECORD', '')\n",
        context=ctx,
    )
    assert build.error is None, build.error
    install = interpreter.run_code(
        "%pip install --no-index --no-deps /tmp/e2edemo-0.1-py3-none-any.whl", context=ctx
    )
    assert install.error is None, install.error
    assert "Successfully installed e2edemo-0.1" in "".join(install.logs.stdout)
    used = interpreter.run_code("import e2edemo\ne2edemo.VALUE", context=ctx)
    assert used.text == "42", used
    interpreter.remove_code_context(ctx)


def test_display_and_streaming_order(interpreter):
    seen = []
    execution = interpreter.run_code(
        "from IPython.display import HTML, Markdown, display\n"
        "print('before')\n"
        "display(HTML('<b>h</b>'))\n"
        "display(Markdown('**m**'))\n"
        "print('after')\n"
        "{'k': [1, 2]}",
        on_stdout=lambda m: seen.append(("out", m.line)),
        on_result=lambda r: seen.append(("result", r.is_main_result)),
    )
    assert execution.error is None, execution.error
    assert seen == [
        ("out", "before\n"),
        ("result", False),
        ("result", False),
        ("out", "after\n"),
        ("result", True),
    ]
    assert execution.results[0].html == "<b>h</b>"
    assert execution.results[1].markdown == "**m**"
    assert execution.results[2].json == {"k": [1, 2]}


def test_dataframe_data(interpreter):
    execution = interpreter.run_code(
        """
        import pandas as pd
        pd.DataFrame({"a": [1, 2, 3]})
        """
    )
    assert execution.error is None, execution.error
    data = execution.results[0].data
    assert data == {"a": [1, 2, 3]}
    assert "<table" in execution.results[0].html


def test_bar_chart_elements(interpreter):
    from e2b_code_interpreter.charts import BarChart, ChartType

    execution = interpreter.run_code(
        """
        import matplotlib.pyplot as plt
        plt.figure(figsize=(10, 6))
        plt.bar(['Author A', 'Author B', 'Author C', 'Author D'], [100, 200, 300, 400], label='Books Sold')
        plt.xlabel('Authors')
        plt.ylabel('Number of Books Sold')
        plt.title('Book Sales by Authors')
        plt.show()
        """
    )
    assert execution.error is None, execution.error
    result = execution.results[0]
    assert result.png
    chart = result.chart
    assert isinstance(chart, BarChart)
    assert chart.type == ChartType.BAR
    assert chart.title == "Book Sales by Authors"
    assert (chart.x_label, chart.y_label) == ("Authors", "Number of Books Sold")
    assert [bar.value for bar in chart.elements] == [100, 200, 300, 400]
    assert [bar.label for bar in chart.elements] == [
        "Author A",
        "Author B",
        "Author C",
        "Author D",
    ]
    assert [bar.group for bar in chart.elements] == ["Books Sold"] * 4


def test_superchart_elements(interpreter):
    from e2b_code_interpreter.charts import LineChart, ScatterChart, SuperChart

    execution = interpreter.run_code(
        """
        import matplotlib.pyplot as plt
        import numpy as np
        fig, axs = plt.subplots(1, 2)
        fig.suptitle('Multiple Charts Example')
        axs[0].plot(np.linspace(0, 10, 100), np.sin(np.linspace(0, 10, 100)), 'r')
        axs[0].set_title('Sine Wave')
        axs[1].scatter([0.1, 0.2, 0.3], [1, 2, 3], label='Dataset 1')
        axs[1].set_title('Scatter Plot')
        plt.show()
        """
    )
    assert execution.error is None, execution.error
    chart = execution.results[0].chart
    assert isinstance(chart, SuperChart)
    assert chart.title == "Multiple Charts Example"
    line, scatter = chart.elements
    assert isinstance(line, LineChart) and line.title == "Sine Wave"
    assert len(line.elements[0].points) == 100
    assert isinstance(scatter, ScatterChart) and scatter.title == "Scatter Plot"
    assert scatter.elements[0].points == [(0.1, 1.0), (0.2, 2.0), (0.3, 3.0)]


def test_error_traceback_has_no_colours(interpreter):
    execution = interpreter.run_code("def f():\n    return 1 / 0\nf()")
    error = execution.error
    assert error.name == "ZeroDivisionError"
    assert error.value == "division by zero"
    # IPython's frame header: `Cell In [n]` in Debian 12's IPython 8.5, `Cell In[n]` later.
    assert "Cell In" in error.traceback
    assert "----> 2     return 1 / 0" in error.traceback
    assert "\x1b[" not in error.traceback
