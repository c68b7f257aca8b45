"""Coppice code-interpreter driver: one persistent Python context.

The agent (coppice-envd) starts this file with a unix stream socket on the fd named by
$COPPICE_DRIVER_FD.
It writes one JSON request per line, {"code", "env", "n"}, and reads one JSON event per
line: ready, result, error, done.  A process started ahead of need gets one {"setup":
{"cwd", "env"}} first, and answers it with ready.  A result or error sent while a cell runs asks for an
acknowledgement ("ack": true), one newline back, so that everything the cell prints after
it reaches the agent after it.  User output is not framed: fds 1 and 2 are pipes the
agent reads as they are written.  The agent interrupts code with SIGINT, which raises
KeyboardInterrupt only while a cell runs.

Cells run in an IPython InteractiveShell when IPython is importable (magics, `!cmd`,
display(), rich MIME bundles, `e2b/data` for DataFrames, `e2b/chart` for matplotlib
figures through charts.py next to this file); otherwise in a plain exec loop with the same
protocol.  See docs/code-interpreter.md.
"""

import ast
import base64
import builtins
import datetime
import io
import json
import linecache
import math
import os
import signal
import socket
import sys
import threading
import traceback
import types

# The agent passes its socket's number; user processes must not inherit it.
_FD = int(os.environ.pop("COPPICE_DRIVER_FD", "3"))
os.set_inheritable(_FD, False)
_CHAN = socket.socket(fileno=_FD)
_REQUESTS = _CHAN.makefile("rb")
_SEND_LOCK = threading.Lock()
_MAIN_THREAD = threading.get_ident()
_DRIVER_GLOBALS = globals()
_HERE = os.path.dirname(os.path.abspath(__file__))
# CPython's CO_COROUTINE flag: set on code compiled from a cell with top-level await.
_CO_COROUTINE = 0x0080
_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_MIME_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/pdf", "_repr_pdf_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
)
_MPL_BACKEND = "_coppice_mpl_backend"

_armed = False
_pending = False
_in_cell = False
_loop = None
_ns = {}
_charts = None


def _on_sigint(signum, frame):
    """Interrupts a cell; a late signal that finds no cell running is dropped."""
    global _pending
    if _armed:
        raise KeyboardInterrupt
    _pending = True


# --- the channel ----------------------------------------------------------------------


def _json_default(obj):
    """JSON for what json cannot encode itself: dates, numpy values, bytes, else str."""
    if isinstance(obj, (datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(obj)


def _clean(value, depth=0):
    """Makes a value JSON-compliant as Jupyter's json_clean does: non-finite floats become
    their repr, non-string keys their str."""
    if depth > 200:
        raise ValueError("nested too deeply")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    return _clean(_json_default(value), depth + 1)


def _dumps(event):
    return json.dumps(event, ensure_ascii=False, allow_nan=False, default=_json_default)


def _encode(event):
    try:
        text = _dumps(event)
    except (TypeError, ValueError, RecursionError):
        try:
            text = _dumps(_clean(event))
        except (TypeError, ValueError, RecursionError):
            if event.get("t") != "result":
                raise
            # A bundle that cannot be JSON at all: its text survives.
            plain = str(event["data"].get("text/plain", ""))
            text = _dumps(dict(event, data={"text/plain": plain}))
    # Lone surrogates cannot travel as JSON text; they become "?".
    return text.encode("utf-8", "replace") + b"\n"


def _send(event, interruptible=True):
    """Sends one event; a SIGINT meanwhile is held back so no frame is torn.

    In a cell, on the main thread, a result or error waits for the agent's
    acknowledgement, so output printed after it cannot overtake it.  An interrupt held
    back is raised afterwards if `interruptible` (display() in user code), else dropped
    with the cell ending anyway.
    """
    global _armed, _pending
    data = _encode(event)
    ack = _in_cell and event.get("t") in ("result", "error") and (
        threading.get_ident() == _MAIN_THREAD
    )
    if ack:
        data = data[:-2] + b',"ack":true}\n'
    was_armed = _armed
    _armed = False
    try:
        _flush_std()
        with _SEND_LOCK:
            _CHAN.sendall(data)
            if ack:
                _REQUESTS.readline()
    finally:
        _armed = was_armed
    if was_armed and _pending:
        _pending = False
        if interruptible:
            raise KeyboardInterrupt


def _flush_std():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _b64(data):
    if isinstance(data, str):
        return data
    return base64.b64encode(bytes(data)).decode("ascii")


def _send_result(data, main):
    """Sends a MIME bundle; binary formats travel as base64, as Jupyter sends them."""
    bundle = {}
    for mime, value in data.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = _b64(value)
        bundle[mime] = value
    _send({"t": "result", "main": main, "data": bundle})


def _report(name, value, text):
    _send({"t": "error", "name": name, "value": value, "traceback": text}, interruptible=False)


# --- matplotlib -------------------------------------------------------------------------


def _figure_png(fig):
    """A figure as base64 PNG, None for a figure with nothing on it (as IPython does)."""
    if not fig.axes and not fig.lines:
        return None
    buf = io.BytesIO()
    fig.canvas.print_figure(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_chart(fig):
    """The `e2b/chart` of a figure, from charts.py, imported on first use."""
    global _charts
    if _charts is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_coppice_charts", os.path.join(_HERE, "charts.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _charts = module
    return _charts.figure_to_chart(fig)


def _show_figures():
    """Shows every open pyplot figure as a result and closes it (IPython inline style)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            _DISPLAY(plt.figure(num))
    finally:
        plt.close("all")


class _Hooks:
    """A meta-path finder for two jobs that must not import anything early: it builds
    the matplotlib backend module when matplotlib asks for it, and it makes matplotlib
    default to that backend when (and only if) user code imports matplotlib.  An
    environment variable would do the latter too, but would leak into subprocesses that
    cannot import the backend."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _MPL_BACKEND and name not in _AFTER_IMPORT:
            return None
        import importlib.machinery

        if name == _MPL_BACKEND:
            return importlib.machinery.ModuleSpec(name, _BackendLoader)
        if name == "matplotlib" and "MPLBACKEND" in os.environ:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterLoader(spec.loader, _AFTER_IMPORT[name])
        return spec


class _AfterLoader:
    """Runs a module's own loader, then adjusts the module."""

    def __init__(self, inner, after):
        self._inner = inner
        self._after = after

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            self._after(module)
        except Exception:
            traceback.print_exc()


def _select_backend(matplotlib):
    matplotlib.rcParams["backend"] = "module://" + _MPL_BACKEND


def _show_saved_images(pil_image):
    """As in E2B's template: an image saved to a path is also displayed."""
    save = pil_image.Image.save

    def save_and_show(self, fp, format=None, **params):
        if isinstance(fp, (str, os.PathLike)):
            _DISPLAY(self)
        return save(self, fp, format, **params)

    save_and_show.__doc__ = save.__doc__
    pil_image.Image.save = save_and_show


_AFTER_IMPORT = {"matplotlib": _select_backend, "PIL.Image": _show_saved_images}


class _BackendLoader:
    """A matplotlib backend whose show() sends the figures instead of opening windows."""

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module):
        from matplotlib.backend_bases import FigureManagerBase
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        def show(*args, **kwargs):
            _show_figures()

        module.FigureCanvas = FigureCanvasAgg
        module.FigureManager = FigureManagerBase
        module.show = show


# --- the plain runner (no IPython) -------------------------------------------------------


def _is_figure(value):
    if "matplotlib" not in sys.modules:
        return False
    figure = sys.modules.get("matplotlib.figure")
    return figure is not None and isinstance(value, figure.Figure)


def _bundle(value):
    """The MIME bundle of a value, as IPython's display formatters would build it."""
    data = {}
    if not isinstance(value, type):
        mimebundle = getattr(value, "_repr_mimebundle_", None)
        if callable(mimebundle):
            try:
                got = mimebundle()
                if isinstance(got, tuple):
                    got = got[0]
                if isinstance(got, dict):
                    data.update(got)
            except Exception:
                traceback.print_exc()
        for mime, name in _MIME_METHODS:
            if mime in data:
                continue
            method = getattr(value, name, None)
            if not callable(method):
                continue
            try:
                got = method()
            except Exception:
                traceback.print_exc()
                continue
            if isinstance(got, tuple):
                got = got[0]
            if got is not None:
                data[mime] = got
    if _is_figure(value):
        for mime, make in (("image/png", _figure_png), ("e2b/chart", _figure_chart)):
            if mime not in data:
                try:
                    got = make(value)
                except Exception:
                    traceback.print_exc()
                    continue
                if got is not None:
                    data[mime] = got
    if "text/plain" not in data:
        data["text/plain"] = repr(value)
    return data


def _plain_display(*objs, **kwargs):
    """Shows objects as non-main results, like IPython's display()."""
    for obj in objs:
        _send_result(_bundle(obj), False)


_DISPLAY = _plain_display


def _plain_report(exc):
    """Sends an error event; the traceback starts at the first frame that is not ours."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals is _DRIVER_GLOBALS:
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        text = ""
    try:
        value = str(exc)
    except Exception:
        value = "<unprintable %s>" % type(exc).__name__
    _report(type(exc).__name__, value, text)


def _plain_eval(code):
    result = eval(code, _ns)
    if code.co_flags & _CO_COROUTINE:
        global _loop
        if _loop is None:
            import asyncio

            _loop = asyncio.new_event_loop()
            asyncio.set_event_loop(_loop)
        result = _loop.run_until_complete(result)
    return result


def _plain_run(code, count):
    """Runs one cell without IPython; the value of a final expression is the main result."""
    global _armed
    filename = "<cell-%d>" % count
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = compile(code, filename, "exec", ast.PyCF_ONLY_AST | _COMPILE_FLAGS, True)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec", _COMPILE_FLAGS, True) if tree.body else None
        tail = compile(last, filename, "eval", _COMPILE_FLAGS, True) if last else None
    except BaseException as exc:
        if isinstance(exc, SyntaxError) and _uses_ipython_syntax(code):
            print(
                "note: IPython is not installed in this sandbox, so `!`, `%` and `%%` "
                "lines are plain Python here (install python3-ipython)",
                file=sys.stderr,
            )
        _plain_report(exc)
        return False
    value = None
    try:
        try:
            _armed = True
            if body is not None:
                _plain_eval(body)
            if tail is not None:
                value = _plain_eval(tail)
        finally:
            _armed = False
        if value is not None:
            _ns["_"] = value
            _send_result(_bundle(value), True)
    except BaseException as exc:
        _armed = False
        _plain_report(exc)
    try:
        _show_figures()
    except BaseException as exc:
        _plain_report(exc)
    return False


def _uses_ipython_syntax(code):
    return any(line.lstrip().startswith(("!", "%")) for line in code.splitlines())


def _plain_start(module):
    builtins.display = _plain_display
    return _plain_run


# --- the IPython runner ------------------------------------------------------------------


def _defer_terminal():
    """Keeps IPython's terminal front end out of the start-up.

    IPython's package `__init__` imports `IPython.terminal.embed` for `IPython.embed`
    alone, and with it prompt_toolkit and jedi: most of IPython's import time, for a
    front end a context never uses.  A stand-in module takes its place in `sys.modules`;
    the first use of any of its names (`IPython.embed()`, `from IPython.terminal.embed
    import ...`) imports the real module, which replaces it.
    """
    name = "IPython.terminal.embed"
    if name in sys.modules:
        return
    stand_in = types.ModuleType(name)

    def real():
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        import importlib

        return importlib.import_module(name)

    def embed(*args, **kwargs):
        return real().embed(*args, **kwargs)

    def attribute(attr):
        if attr.startswith("__"):
            # The import system probes names like __path__: not a use.
            raise AttributeError(attr)
        return getattr(real(), attr)

    stand_in.embed = embed
    stand_in.__getattr__ = attribute
    sys.modules[name] = stand_in


class _NoJedi:
    """A meta-path finder, in place only while IPython is imported, for which jedi is
    not installed.  IPython's completer module imports jedi at its top, a third of the
    start-up time, for tab completion, which no context request asks for.  The completer
    then completes without jedi; user code imports jedi as usual once the shell is up."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "jedi" or name.startswith("jedi."):
            raise ImportError("jedi is not imported while IPython starts", name=name)
        return None


def _ipython_start(module):
    """Starts an InteractiveShell on `module`; returns the cell runner, or None when
    IPython is not installed."""
    _defer_terminal()
    sys.meta_path.insert(0, _NoJedi)
    try:
        return _ipython_shell(module)
    finally:
        sys.meta_path.remove(_NoJedi)


def _ipython_shell(module):
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError as exc:
        if getattr(exc, "name", None) != "IPython":
            # Installed but broken: say why the cells run without it.
            print("note: IPython cannot be imported (%s); cells run without it" % exc, file=sys.stderr)
        return None
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Type, Unicode
    from traitlets.config import Config

    global _DISPLAY

    class _Hook(DisplayHook):
        """Sends the value of a cell's final expression as the main result."""

        def compute_format_data(self, result):
            # The hot path (`x + 1`): a value of a plain built-in type has no rich
            # representation unless someone registered a formatter for its type, and
            # asking all fourteen formatters costs more than the rest of the cell.
            kind = type(result)
            if kind in _PLAIN_TYPES and not _has_printer(self.shell.display_formatter, kind):
                return {"text/plain": plain(result)}, {}
            return super().compute_format_data(result)

        def start_displayhook(self):
            self._bundle = None

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            self._bundle = format_dict

        def finish_displayhook(self):
            bundle, self._bundle = self._bundle, None
            if bundle:
                _send_result(bundle, True)

    class _Publisher(DisplayPublisher):
        """Sends display() output as results; updates and clears are not part of
        E2B's stream, so they are dropped as E2B drops them."""

        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            if not update:
                _send_result(data, False)

        def clear_output(self, wait=False):
            pass

    class _Shell(InteractiveShell):
        displayhook_class = Type(_Hook)
        display_pub_class = Type(_Publisher)

        def _showtraceback(self, etype, evalue, stb):
            # Jupyter's error message: ename, evalue and the structured traceback, which
            # E2B joins with "".
            try:
                value = str(evalue)
            except Exception:
                value = "<unprintable %s>" % etype.__name__
            _report(etype.__name__, value, "".join(stb))

        def ask_exit(self):
            # exit() and quit(); the loop ends the context after the cell.
            self.exit_now = True

        def enable_gui(self, gui=None):
            # No GUI event loop runs in a sandbox; figures go out through display().
            pass

        # Completion is no part of E2B's protocol, and building the completer imports
        # jedi, a large share of the start-up time: it is built on first use instead.
        _completer = None

        def init_completer(self):
            pass

        @property
        def Completer(self):
            if self._completer is None:
                InteractiveShell.init_completer(self)
            return self._completer

        @Completer.setter
        def Completer(self, value):
            self._completer = value

    class _DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)

    class _ChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict, str)

    class _JSONFormatter(JSONFormatter):
        """Lists and dicts are JSON too, as in E2B's template."""

        def __call__(self, obj):
            if isinstance(obj, (list, dict)):
                try:
                    return _jsonable(obj, 0), {"expanded": True}
                except (TypeError, ValueError, RecursionError):
                    pass
            return super().__call__(obj)

    config = Config()
    config.InteractiveShell.colors = "NoColor"
    config.HistoryManager.enabled = False
    config.PlainTextFormatter.max_seq_length = 0
    shell = _Shell.instance(config=config, user_module=module)
    formatters = shell.display_formatter.formatters
    png = formatters["image/png"]
    png.for_type_by_name("matplotlib.figure", "Figure", _figure_png)
    data = _DataFormatter(parent=shell.display_formatter)
    data.for_type_by_name("pandas.core.frame", "DataFrame", _frame_data)
    formatters["e2b/data"] = data
    chart = _ChartFormatter(parent=shell.display_formatter)
    chart.for_type_by_name("matplotlib.figure", "Figure", _figure_chart)
    formatters["e2b/chart"] = chart
    formatters["application/json"] = _JSONFormatter(parent=shell.display_formatter)
    plain = formatters["text/plain"]
    shell.events.register("post_execute", _show_figures)
    _wrap_pip(shell)

    from IPython.display import display

    _DISPLAY = display

    def run(code, count):
        global _armed
        shell.execution_count = count
        try:
            _armed = True
            shell.run_cell(code, store_history=True)
        finally:
            _armed = False
        # exit()/quit() end the context, as they end a Jupyter kernel; the agent reports
        # the restart and the next execution starts a fresh one.
        return bool(shell.exit_now)

    return run


# Built-in types whose only representation is text, unless a formatter is registered.
_PLAIN_TYPES = frozenset((int, float, complex, bool, str, bytes, range, type(None)))


def _has_printer(display_formatter, kind):
    """Whether any formatter but text/plain was given a printer for `kind`."""
    key = (kind.__module__, kind.__name__)
    for mime, formatter in display_formatter.formatters.items():
        if mime == "text/plain":
            continue
        if kind in formatter.type_printers or key in formatter.deferred_printers:
            return True
    for formatter in (display_formatter.ipython_display_formatter, display_formatter.mimebundle_formatter):
        if kind in formatter.type_printers or key in formatter.deferred_printers:
            return True
    return False


def _frame_data(frame):
    """`e2b/data` of a DataFrame: its columns as lists, timestamps as ISO strings."""
    pandas = sys.modules["pandas"]
    data = frame.to_dict(orient="list")
    for key, values in data.items():
        data[key] = [v.isoformat() if isinstance(v, pandas.Timestamp) else v for v in values]
    return data


def _jsonable(value, depth):
    """A JSON-ready copy of a list or dict, the way E2B's orjson-based formatter sees it:
    NaN becomes null, keys become strings, dates ISO strings, numpy values plain ones;
    anything else is a TypeError."""
    if depth > 254:
        raise TypeError("too deep")
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise TypeError("integer out of range")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if type(value).__module__ == "numpy":
        return _jsonable(value.tolist(), depth + 1)
    raise TypeError(type(value).__name__)


def _json_key(key):
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (int, float)):
        return str(key)
    if isinstance(key, (datetime.date, datetime.time)):
        return key.isoformat()
    raise TypeError("key " + type(key).__name__)


def _wrap_pip(shell):
    """After %pip, a user site-packages that did not exist at start is put on sys.path,
    so a package installed with --user imports without a restart."""
    magic = shell.magics_manager.magics["line"].get("pip")
    if magic is None:
        return

    def pip(line):
        result = magic(line)
        import importlib
        import site

        user_site = getattr(site, "USER_SITE", None)
        if site.ENABLE_USER_SITE and user_site and os.path.isdir(user_site):
            if user_site not in sys.path:
                site.addsitedir(user_site)
        importlib.invalidate_caches()
        return result

    pip.__doc__ = magic.__doc__
    shell.magics_manager.magics["line"]["pip"] = pip


# --- the loop -----------------------------------------------------------------------------


def _apply_env(env):
    saved = {}
    for key, val in env.items():
        saved[key] = os.environ.get(key)
        os.environ[key] = val
    return saved


def _restore_env(saved):
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _setup(setup):
    """Moves a process started ahead of need (a spare, see the agent's `Spare`) to its
    context: its working directory and the sandbox's environment, for good.  Answers
    ready; a directory it cannot enter ends the process, and the agent starts another."""
    try:
        os.chdir(setup["cwd"])
    except OSError:
        os._exit(1)
    for key, val in (setup.get("env") or {}).items():
        os.environ[key] = val
    _send({"t": "ready", "pid": os.getpid()})


def main():
    global _pending, _ns, _in_cell
    signal.signal(signal.SIGINT, _on_sigint)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)
    # Cells run in a fresh __main__ with the working directory first on sys.path, as in
    # IPython; the driver's own globals stay in this module.
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    _ns = module.__dict__
    sys.path[0] = ""
    sys.meta_path.insert(0, _Hooks)
    # pip refuses Debian's python (PEP 668); in a sandbox `%pip install` must just work,
    # as it does on E2B's image.
    os.environ.setdefault("PIP_BREAK_SYSTEM_PACKAGES", "1")
    run = _ipython_start(module) or _plain_start(module)
    _send({"t": "ready", "pid": os.getpid()})
    while True:
        line = _REQUESTS.readline()
        if not line:
            return
        if not line.strip():
            continue
        _pending = False
        try:
            request = json.loads(line)
            if "setup" in request:
                _setup(request["setup"])
                continue
            saved = _apply_env(request.get("env") or {})
            _in_cell = True
            try:
                if run(request["code"], request.get("n", 0)):
                    _flush_std()
                    return
            finally:
                _in_cell = False
                _restore_env(saved)
        except BaseException as exc:
            _armed_off()
            _plain_report(exc)
        _flush_std()
        _send({"t": "done"})


def _armed_off():
    global _armed, _in_cell
    _armed = False
    _in_cell = False


if __name__ == "__main__":
    main()
