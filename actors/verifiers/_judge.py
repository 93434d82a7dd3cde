"""The judge of a sandboxed run: runs the tests outside the sandbox and decides the verdict.

Standard library only (``python -I -S``). The job comes as JSON on stdin: the program, the
trusted prompt (helpers the tests call, e.g. HumanEval's ``poly``), the test code, the entry
point and the two descriptors that reach the candidate (:mod:`_harness`). The test's
``check`` gets a proxy: each call travels to the candidate as plain data (:mod:`_plain`) and
its answer comes back as a builtin value, so the assertions, their counts and the verdict
are computed here, in a process the candidate cannot reach. The verdict is one JSON line on
the original stdout.
"""

import ast
import builtins
import contextlib
import json
import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plain


class CandidateGone(BaseException):
    """The candidate stopped answering (exited, died, timed out, or sent a malformed reply).

    A ``BaseException`` so that a test's own ``except Exception`` cannot swallow it."""

    def __init__(self, event: str, type_: str = "", msg: str = "") -> None:
        super().__init__(msg)
        self.event, self.type, self.msg = event, type_, msg


class CandidateRaised(Exception):
    """The candidate raised an exception that is not a builtin one."""


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


class Channel:
    """Line-framed plain data to and from the candidate, bounded in size and time."""

    def __init__(self, req_fd: int, rep_fd: int, deadline: float, max_bytes: int) -> None:
        self.req_fd, self.rep_fd = req_fd, rep_fd
        self.deadline, self.max_bytes = deadline, max_bytes
        self.buffer = bytearray()
        self.calls = 0

    def send(self, *message: object) -> None:
        view = memoryview(_plain.encode(message))
        try:
            while view:
                view = view[os.write(self.req_fd, view) :]
        except OSError:
            raise CandidateGone("gone", msg="the candidate stopped reading") from None

    def receive(self) -> tuple:
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.rep_fd], [], [], left)[0]:
                raise CandidateGone("timeout", msg="wall-clock timeout")
            chunk = os.read(self.rep_fd, 1 << 16)
            if not chunk:
                raise CandidateGone("gone", msg="the candidate exited")
            self.buffer.extend(chunk)
            if len(self.buffer) > self.max_bytes:
                raise CandidateGone("error", "ValueError", "reply larger than the limit")
        cut = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:cut])
        del self.buffer[:cut]
        try:
            message = _plain.decode(line)
        except ValueError as exc:
            raise CandidateGone("error", "ValueError", f"malformed reply: {exc}") from None
        if type(message) is not tuple or not message or type(message[0]) is not str:
            raise CandidateGone("error", "ValueError", "malformed reply")
        return message

    def call(self, args: tuple, kwargs: dict) -> object:
        """One call of the candidate; its return value, or its exception raised here."""
        try:
            self.send(args, kwargs)
        except TypeError as exc:
            raise CandidateGone("unsupported", "TypeError", f"cannot forward: {exc}") from None
        self.calls += 1
        reply = self.receive()
        if reply[0] == "value" and len(reply) == 2:
            return reply[1]
        if reply[0] == "raised" and len(reply) == 3:
            name, msg = str(reply[1]), str(reply[2])
            kind = getattr(builtins, name, None)
            if isinstance(kind, type) and issubclass(kind, Exception):
                raise kind(msg)
            raise CandidateRaised(f"{name}: {msg}")
        if reply[0] == "error" and len(reply) == 4:
            raise CandidateGone(str(reply[1]), str(reply[2]), str(reply[3]))
        raise CandidateGone("error", "ValueError", "malformed reply")


def main() -> None:
    job = json.loads(sys.stdin.read())
    verdict_fd = os.dup(1)
    sink = open(os.devnull, "w")  # noqa: SIM115 - the tests' prints must not reach the verdict
    sys.stdout = sys.stderr = sink
    os.dup2(sink.fileno(), 1)
    counts = {"passed": 0, "failed": 0, "static": 0}

    def verdict(event: str, **kw: object) -> None:
        line = json.dumps({"event": event, **counts, **kw}) + "\n"
        os.write(verdict_fd, line.encode())
        os._exit(0)

    chan = Channel(
        job["req_fd"], job["rep_fd"], time.monotonic() + job["timeout_s"], job["max_reply_bytes"]
    )
    entry = job["entry_point"]
    try:
        chan.send(job["program"], entry)
        ready = chan.receive()
    except CandidateGone as gone:
        verdict(gone.event, phase="program", type=gone.type, msg=gone.msg)
    if ready[0] == "error" and len(ready) == 4:
        verdict(str(ready[1]), phase="program", type=str(ready[2]), msg=str(ready[3]))
    if ready != ("ready",):
        verdict("error", phase="program", type="ValueError", msg="malformed reply")

    def candidate(*args: object, **kwargs: object) -> object:
        return chan.call(args, kwargs)

    candidate.__name__ = entry
    ns: dict = {"__name__": "__embr_tests__", "__builtins__": builtins}
    with contextlib.suppress(Exception):  # a prompt that does not run alone loses its helpers
        exec(compile(job["prompt"], "<prompt>", "exec"), ns)
    ns[entry] = candidate

    def embr_fail(test: object) -> bool:
        ok = bool(test)
        counts["passed" if ok else "failed"] += 1
        return not ok

    try:
        rewriter = _AssertRewriter(job["all_asserts"])
        tree = ast.fix_missing_locations(rewriter.visit(ast.parse(job["test"], "<test>")))
        counts["static"] = rewriter.count
        test_code = compile(tree, "<test>", "exec")
        ns["__embr_fail__"] = embr_fail
        exec(test_code, ns)
        check = ns["check"]
    except BaseException as exc:
        verdict("error", phase="test", type=type(exc).__name__, msg=str(exc)[:500])
    try:
        check(candidate)
    except CandidateGone as gone:
        verdict(gone.event, phase="check", type=gone.type, msg=gone.msg[:500])
    except AssertionError as exc:
        verdict("failed", phase="check", type="AssertionError", msg=str(exc)[:500])
    except BaseException as exc:
        verdict("error", phase="check", type=type(exc).__name__, msg=str(exc)[:500])
    if counts["failed"]:
        verdict("failed", phase="check", type="AssertionError", msg="")
    verdict("done", calls=chan.calls)


if __name__ == "__main__":
    main()
