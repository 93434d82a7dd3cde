"""Runs one program and its tests inside the sandbox (executed by ``python -I -S``).

Standard library only: it runs under whatever interpreter the sandbox can see. The
parent passes a job file path as ``argv[1]``. Events go to the result descriptor as JSON
lines. The last event (``done``, ``failed``, ``error``, ``memory`` or ``exit``) carries the
secret token, which the harness reads from its own pipe only once the untrusted code has
stopped; the parent ignores every event without it.
"""

import ast
import builtins
import contextlib
import json
import os
import resource
import sys

_PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
_CONTAINERS = (list, tuple, set, frozenset)


def _is_plain(value: object) -> bool:
    """True when ``value`` is built only from builtin types (no custom ``__eq__``)."""
    stack = [value]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > 1_000_000:
            return False
        kind = type(item)
        if kind not in _PLAIN:
            return False
        if kind in _CONTAINERS:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
    return True


class _AssertRewriter(ast.NodeTransformer):
    """``assert t, m`` -> ``if __embr_fail__(t): raise AssertionError(m)`` (or no raise)."""

    def __init__(self, keep_going: bool) -> None:
        self.keep_going = keep_going
        self.count = 0

    def visit_Assert(self, node: ast.Assert) -> ast.stmt:
        self.count += 1
        call = ast.Call(ast.Name("__embr_fail__", ast.Load()), [node.test], [])
        if self.keep_going:
            new: ast.stmt = ast.Expr(call)
        else:
            exc = ast.Call(
                ast.Name("AssertionError", ast.Load()), [node.msg] if node.msg else [], []
            )
            new = ast.If(call, [ast.Raise(exc, None)], [])
        return ast.copy_location(new, node)


def main() -> None:
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    out_fd = job["result_fd"]
    token_fd = job["token_fd"]
    # Bound now: the program may replace os.read/os.write/os._exit on the shared module.
    read, write, dumps, exit_ = os.read, os.write, json.dumps, os._exit

    def report(event: str, **kw: object) -> None:
        with contextlib.suppress(Exception):
            write(out_fd, (dumps({"event": event, **kw}) + "\n").encode())

    def final(event: str, **kw: object) -> None:
        """The last event, authenticated with the token (read only now, after the
        untrusted code has stopped running), then exit."""
        try:
            token = read(token_fd, 256).decode()
        except Exception:
            token = ""
        report(event, token=token, **kw)
        exit_(0 if event == "done" else 1)

    def fail(event: str, phase: str, exc: BaseException, **kw: object) -> None:
        final(event, phase=phase, type=type(exc).__name__, msg=str(exc)[:500], **kw)

    lim = job["limits"]
    for name, value in (
        ("RLIMIT_CPU", lim["cpu_s"]),
        ("RLIMIT_AS", lim["memory_bytes"]),
        ("RLIMIT_FSIZE", lim["file_bytes"]),
        ("RLIMIT_NOFILE", lim["open_files"]),
        ("RLIMIT_NPROC", lim["processes"]),
        ("RLIMIT_CORE", 0),
    ):
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))
    report("start")

    ns: dict = {"__name__": "__embr_program__", "__builtins__": builtins}
    saved_builtins = dict(builtins.__dict__)
    saved_modules = dict(sys.modules)
    try:
        code = compile(job["program"], "<program>", "exec")
    except BaseException as exc:
        fail("error", "program", exc)
    try:
        exec(code, ns)
    except SystemExit as exc:
        fail("exit", "program", exc)
    except MemoryError as exc:
        fail("memory", "program", exc)
    except BaseException as exc:
        fail("error", "program", exc)

    # Undo what the program may have done to the environment the tests rely on.
    sys.settrace(None)
    sys.setprofile(None)
    builtins.__dict__.clear()
    builtins.__dict__.update(saved_builtins)
    for mod in [m for m in sys.modules if m not in saved_modules]:
        del sys.modules[mod]
    sys.modules.update(saved_modules)
    entry = job["entry_point"]
    for name in [n for n in ns if n in saved_builtins and n != entry and n != "__builtins__"]:
        del ns[name]
    ns["__builtins__"] = builtins

    candidate = ns.get(entry)
    if not callable(candidate):
        final("error", phase="program", type="NameError", msg=f"{entry!r} is not defined")

    counts = {"passed": 0, "failed": 0}

    def embr_fail(test: object) -> bool:
        ok = bool(test)
        counts["passed" if ok else "failed"] += 1
        return not ok

    def guarded(*args: object, **kwargs: object) -> object:
        result = candidate(*args, **kwargs)
        if not _is_plain(result):
            raise TypeError(
                f"candidate returned a non-builtin object of type {type(result).__name__}"
            )
        return result

    guarded.__name__ = getattr(candidate, "__name__", entry)
    guarded.__doc__ = getattr(candidate, "__doc__", None)

    try:
        tree = ast.parse(job["test"], "<test>")
        rewriter = _AssertRewriter(job["all_asserts"])
        tree = ast.fix_missing_locations(rewriter.visit(tree))
        test_code = compile(tree, "<test>", "exec")
    except BaseException as exc:
        fail("error", "test", exc)
    ns["__embr_fail__"] = embr_fail
    try:
        exec(test_code, ns)
        check = ns["check"]
        check(guarded)
    except SystemExit as exc:
        fail("exit", "check", exc, **counts, static=rewriter.count)
    except MemoryError as exc:
        fail("memory", "check", exc, **counts, static=rewriter.count)
    except AssertionError as exc:
        fail("failed", "check", exc, **counts, static=rewriter.count)
    except BaseException as exc:
        fail("error", "check", exc, **counts, static=rewriter.count)

    if counts["failed"]:
        final(
            "failed", phase="check", type="AssertionError", msg="", **counts, static=rewriter.count
        )
    final("done", **counts, static=rewriter.count)


if __name__ == "__main__":
    main()
