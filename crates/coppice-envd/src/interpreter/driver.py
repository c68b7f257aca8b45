"""Coppice code-interpreter driver: one persistent Python context.

The agent (coppice-envd) starts this file with a unix stream socket on the fd named by
$COPPICE_DRIVER_FD.
It writes one JSON request per line, {"code", "env", "n"}, and reads one JSON event per
line: ready, result, error, done.  User output is not framed: fds 1 and 2 are pipes the
agent reads as they are written.  The agent interrupts code with SIGINT, which raises
KeyboardInterrupt only while user code runs.  See docs/code-interpreter.md.
"""

import ast
import base64
import builtins
import io
import json
import linecache
import os
import signal
import socket
import sys
import traceback
import types

# The agent passes its socket's number; user processes must not inherit it.
_FD = int(os.environ.pop("COPPICE_DRIVER_FD", "3"))
os.set_inheritable(_FD, False)
_CHAN = socket.socket(fileno=_FD)
_REQUESTS = _CHAN.makefile("rb")
_DRIVER_GLOBALS = globals()
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
_loop = None
_ns = {}


def _on_sigint(signum, frame):
    """Interrupts user code; a late signal that finds no user code running is dropped."""
    global _pending
    if _armed:
        raise KeyboardInterrupt
    _pending = True


def _encode(event):
    # Lone surrogates cannot travel as JSON text; they become "?".
    text = json.dumps(event, ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "replace") + b"\n"


def _send(event):
    """Sends one event; a SIGINT during the write is held back so no frame is torn."""
    global _armed, _pending
    was_armed = _armed
    _armed = False
    try:
        _CHAN.sendall(_encode(event))
    finally:
        _armed = was_armed
    if was_armed and _pending:
        _pending = False
        raise KeyboardInterrupt


def _b64(data):
    if isinstance(data, str):
        return data
    return base64.b64encode(bytes(data)).decode("ascii")


def _is_figure(value):
    if "matplotlib" not in sys.modules:
        return False
    figure = sys.modules.get("matplotlib.figure")
    return figure is not None and isinstance(value, figure.Figure)


def _figure_png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    if _is_figure(value) and "image/png" not in data:
        try:
            data["image/png"] = _figure_png(value)
        except Exception:
            traceback.print_exc()
    if "text/plain" not in data:
        data["text/plain"] = repr(value)
    for mime in ("image/png", "image/jpeg", "application/pdf"):
        if mime in data:
            data[mime] = _b64(data[mime])
    return data


def _emit_result(value, main):
    data = _bundle(value)
    try:
        _send({"t": "result", "main": main, "data": data})
    except (TypeError, ValueError):
        # Encoding failed before anything was sent (a NaN in _repr_json_, say): keep the
        # text.
        _send({"t": "result", "main": main, "data": {"text/plain": str(data["text/plain"])}})


def display(*objs, **kwargs):
    """Shows objects as non-main results, like IPython's display()."""
    for obj in objs:
        _emit_result(obj, False)


def _flush_figures():
    """Sends every open matplotlib figure as a result and closes it (IPython inline style)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            _emit_result(plt.figure(num), False)
    finally:
        plt.close("all")


class _MplBackendLoader:
    """Imports a matplotlib backend whose show() sends the figures instead of opening
    windows. It is built when matplotlib asks for it, so the driver never imports
    matplotlib itself."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _MPL_BACKEND:
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(name, _MplBackendLoader)

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module):
        from matplotlib.backend_bases import FigureManagerBase
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        def show(*args, **kwargs):
            _flush_figures()

        module.FigureCanvas = FigureCanvasAgg
        module.FigureManager = FigureManagerBase
        module.show = show


def _install_mpl_backend():
    sys.meta_path.append(_MplBackendLoader)
    os.environ.setdefault("MPLBACKEND", "module://" + _MPL_BACKEND)


def _report(exc):
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
    _send({"t": "error", "name": type(exc).__name__, "value": value, "traceback": text})


def _run(code):
    result = eval(code, _ns)
    if code.co_flags & _CO_COROUTINE:
        global _loop
        if _loop is None:
            import asyncio

            _loop = asyncio.new_event_loop()
            asyncio.set_event_loop(_loop)
        result = _loop.run_until_complete(result)
    return result


def _execute(code, count):
    """Runs one cell; the value of a final expression is the main result."""
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
        _report(exc)
        return
    value = None
    try:
        try:
            _armed = True
            if body is not None:
                _run(body)
            if tail is not None:
                value = _run(tail)
        finally:
            _armed = False
        if value is not None:
            _ns["_"] = value
            _emit_result(value, True)
    except BaseException as exc:
        _armed = False
        _report(exc)


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


def _flush_std():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def main():
    global _pending, _ns
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
    builtins.display = display
    _install_mpl_backend()
    _send({"t": "ready", "pid": os.getpid()})
    while True:
        line = _REQUESTS.readline()
        if not line:
            return
        _pending = False
        try:
            request = json.loads(line)
            saved = _apply_env(request.get("env") or {})
            try:
                _execute(request["code"], request.get("n", 0))
                _flush_figures()
            finally:
                _restore_env(saved)
        except BaseException as exc:
            _armed_off()
            _report(exc)
        _flush_std()
        _send({"t": "done"})


def _armed_off():
    global _armed
    _armed = False


if __name__ == "__main__":
    main()
