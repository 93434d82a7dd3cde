"""Sandboxed execution of a program against its unit tests (HumanEval semantics).

``run_tests(program, test, entry_point)`` runs ``program``, then ``test``, then
``check(entry_point)`` in a fresh interpreter inside a sandbox and says whether the check
ran to completion. Isolation, strongest first:

- ``bwrap``: bubblewrap with new user, PID, network, IPC, UTS and cgroup namespaces, a
  read-only view of ``/usr`` (and the interpreter's prefix), a private tmpfs as working
  directory, no access to the caller's files, no nested user namespaces.
- ``unshare``: ``unshare`` with new user, PID, network, IPC, UTS and mount namespaces; the
  host filesystem stays visible (read access follows file permissions).
- ``rlimit``: resource limits only.

Every mode adds rlimits (CPU seconds, address space, processes, file size, open files),
a wall-clock timeout that kills the whole process tree, stdin on ``/dev/null``, and, when
the scorer is root, a fresh unprivileged uid per run (so the process limit is enforced and
the program cannot signal or write anything the caller owns).

The verdict is decided outside the sandbox. Only the program and a small call server
(``_harness.py``) run inside it; the tests run in a separate judge process
(``_judge.py``) whose ``check`` calls the candidate through a pipe, one call at a time,
with arguments and return values as plain builtin data (``_plain.py``). The sandbox holds
no test, no expected value, no token and no reporting channel, so nothing the program does
to its own process, its output or its exit can produce a pass: all it can send is a return
value, which the judge compares itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("passed", "failed", "error", "timeout", "memory", "killed", "sandbox_error")
MODES = ("auto", "bwrap", "unshare", "rlimit")
_HERE = Path(__file__).parent
# The judge stops itself at the run's timeout; this much more before it is killed.
_JUDGE_GRACE_S = 2.0
# After the verdict, the candidate gets this long to flush its output and exit.
_EXIT_GRACE_S = 1.0
_SANDBOX_UID = 1000
SANDBOX_UID_BASE = 0x40000000


class IsolationError(RuntimeError):
    """Raised when isolation is required but bubblewrap cannot run here."""


class IsolationWarning(RuntimeWarning):
    """Emitted once when the sandbox falls back to weaker isolation than bubblewrap."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 64
    tmpfs_mb: int = 64
    max_output_chars: int = 4096
    max_reply_mb: int = 16


@dataclass
class CodeResult:
    """Outcome of one sandboxed run; ``status`` is one of :data:`STATUSES`."""

    passed: bool
    status: str
    fraction: float = 0.0
    output: str = ""
    message: str = ""
    isolation: str = ""
    asserts_passed: int = 0
    asserts_total: int = 0
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- environment


def _world_usable(path: str) -> bool:
    """True when an unrelated uid can execute ``path`` (every parent directory traversable)."""
    p = Path(path)
    try:
        if not p.is_file() or not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(q.stat().st_mode & stat.S_IXOTH for q in p.parents)
    except OSError:
        return False


def find_python() -> str | None:
    """An interpreter the sandbox uid can run: the current base interpreter, else a system one."""
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable))]
    candidates += [os.path.realpath(p) for p in ("/usr/bin/python3", "/usr/local/bin/python3")]
    for cand in candidates:
        if _world_usable(cand):
            return cand
    return None


def _is_root() -> bool:
    return os.geteuid() == 0


def _system_binds(python: str) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = str(Path(python).parent.parent)
    if not prefix.startswith("/usr/") and prefix != "/usr" and prefix != "/":
        args += ["--ro-bind", prefix, prefix]
    return args


def _bwrap_cmd(python: str, task_dir: str, limits: SandboxLimits) -> list[str]:
    return [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        *_system_binds(python),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(limits.tmpfs_mb << 20),
        "--tmpfs", "/tmp",
        # bwrap's /dev is an unbounded writable tmpfs (with /dev/shm in it): a bounded
        # /dev/shm of its own, and /dev itself read-only (its device nodes still work).
        "--size", str(limits.tmpfs_mb << 20),
        "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",
        "--ro-bind", task_dir, "/task",
        "--chdir", "/tmp",
        "--uid", str(_SANDBOX_UID),
        "--gid", str(_SANDBOX_UID),
        "--hostname", "sandbox",
        "--",
    ]  # fmt: skip


def _unshare_cmd() -> list[str]:
    return [
        shutil.which("unshare") or "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "--pid",
        "--ipc",
        "--uts",
        "--mount",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]


def _probe(cmd: list[str], user: int | None) -> bool:
    try:
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


_DETECTED: dict[str, bool] = {}
_DETECT_LOCK = threading.Lock()


def available(mode: str) -> bool:
    """Whether isolation ``mode`` works on this machine (probed once, then cached)."""
    if mode == "rlimit":
        return True
    with _DETECT_LOCK:
        if mode not in _DETECTED:
            python = find_python()
            uid = _fresh_uid() if _is_root() else None
            if python is None:
                ok = False
            elif mode == "bwrap":
                with tempfile.TemporaryDirectory() as d:
                    os.chmod(d, 0o755)
                    cmd = [
                        *_bwrap_cmd(python, d, SandboxLimits()),
                        python,
                        "-I",
                        "-S",
                        "-c",
                        "pass",
                    ]
                    ok = shutil.which("bwrap") is not None and _probe(cmd, uid)
            else:
                cmd = [*_unshare_cmd(), python, "-I", "-S", "-c", "pass"]
                ok = shutil.which("unshare") is not None and _probe(cmd, uid)
            _DETECTED[mode] = ok
        return _DETECTED[mode]


_WARNED: set[str] = set()


def resolve_mode(mode: str = "auto", require_isolation: bool = False) -> str:
    """The isolation mode to use: ``bwrap`` if it runs, else the best fallback.

    Raises :class:`IsolationError` when ``require_isolation`` and bubblewrap is unusable,
    and ``ValueError`` for an unknown mode. A fallback is announced with an
    :class:`IsolationWarning` (once per mode).
    """
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode in ("auto", "bwrap") and available("bwrap"):
        return "bwrap"
    if require_isolation and mode in ("unshare", "rlimit"):
        raise IsolationError(
            f"verifier.code.require_isolation=true conflicts with verifier.code.sandbox={mode!r}"
        )
    if require_isolation:
        raise IsolationError(
            "verifier.code.require_isolation=true but bubblewrap (bwrap) cannot run here; "
            "install the 'bubblewrap' package and allow user namespaces"
        )
    chosen = (
        mode if mode in ("unshare", "rlimit") else ("unshare" if available("unshare") else "rlimit")
    )
    if chosen == "unshare" and not available("unshare"):
        chosen = "rlimit"
    if chosen not in _WARNED:
        _WARNED.add(chosen)
        warnings.warn(
            f"code sandbox: bubblewrap unavailable or not chosen; using '{chosen}' isolation "
            "(weaker: the host filesystem is visible to sandboxed programs)",
            IsolationWarning,
            stacklevel=2,
        )
    return chosen


def _fresh_uid() -> int:
    """A uid no real account uses, so that process limits and signals stay per run."""
    return SANDBOX_UID_BASE + secrets.randbelow(1 << 24)


def sandbox_processes(uid: int | None = None) -> list[int]:
    """Pids of live (non-zombie) processes running under sandbox uid ``uid`` (any sandbox
    uid when None); only meaningful for a root scorer, whose runs get throwaway uids."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            owner = int(fields["Uid"].split()[0])
            state = fields["State"].split()[0]
        except (OSError, KeyError, ValueError, IndexError):
            continue
        mine = (
            owner == uid
            if uid is not None
            else SANDBOX_UID_BASE <= owner < SANDBOX_UID_BASE + (1 << 24)
        )
        if mine and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _count_processes(uid: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _kill_uid(python: str, uid: int) -> None:
    """Kill every process of ``uid`` (a throwaway uid: it owns only what the run started)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [python, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=uid,
            group=uid,
            extra_groups=[],
            timeout=10,
        )


# --------------------------------------------------------------------------- running


def run_tests(
    program: str,
    test: str,
    entry_point: str,
    timeout_s: float = 10.0,
    *,
    mode: str = "auto",
    require_isolation: bool = False,
    limits: SandboxLimits | None = None,
    all_asserts: bool = False,
    python: str | None = None,
    prompt: str = "",
) -> CodeResult:
    """Run ``check(entry_point)`` of ``test`` in the judge against ``program`` in a sandbox.

    ``prompt`` (trusted, e.g. HumanEval's prompt) runs in the judge before ``test``, so the
    tests find the helpers it defines; ``program`` runs only in the sandbox.

    ``all_asserts=True`` keeps going after a failed ``assert`` so that ``fraction`` counts
    every assert; otherwise the first failure stops the check. Never raises on bad input
    (the result says why it failed), except :class:`IsolationError` when
    ``require_isolation`` cannot be met.
    """
    start = time.monotonic()
    if not all(isinstance(x, str) for x in (program, test, entry_point, prompt)):
        return CodeResult(
            False, "error", message="program, test, entry_point and prompt must be strings"
        )
    if not entry_point.isidentifier():
        return CodeResult(False, "error", message=f"bad entry point {entry_point!r}")
    limits = limits or SandboxLimits()
    isolation = resolve_mode(mode, require_isolation)
    python = python or find_python()
    if python is None:
        return CodeResult(
            False,
            "sandbox_error",
            message="no interpreter usable by the sandbox",
            isolation=isolation,
        )
    try:
        result = _run(
            program,
            test,
            entry_point,
            prompt,
            float(timeout_s),
            isolation,
            limits,
            all_asserts,
            python,
        )
    except Exception as exc:  # a scorer must keep going whatever the sandbox did
        result = CodeResult(False, "sandbox_error", message=f"{type(exc).__name__}: {exc}")
    result.isolation = isolation
    result.duration_s = time.monotonic() - start
    return result


def _run(  # noqa: C901, PLR0915  (one sandboxed run, start to verdict, in order)
    program: str,
    test: str,
    entry_point: str,
    prompt: str,
    timeout_s: float,
    isolation: str,
    limits: SandboxLimits,
    all_asserts: bool,
    python: str,
) -> CodeResult:
    root = _is_root()
    uid = _fresh_uid() if root else None
    task_dir = tempfile.mkdtemp(prefix="embr-sbx-")  # what the sandbox sees: the harness only
    private = tempfile.mkdtemp(prefix="embr-out-")  # what it must not see: its captured output
    fds: list[int] = []
    candidate = judge = None
    try:
        os.chmod(task_dir, 0o755)
        work = os.path.join(private, "work")
        os.mkdir(work)
        if uid is not None:
            os.chown(work, uid, uid)
        out_path = os.path.join(private, "output")
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fds.append(out_fd)
        req_r, req_w = os.pipe()  # judge -> candidate: the program, then one call per line
        rep_r, rep_w = os.pipe()  # candidate -> judge: one return value per line
        fds += [req_r, req_w, rep_r, rep_w]
        for name in ("_harness.py", "_plain.py"):
            shutil.copyfile(_HERE / name, os.path.join(task_dir, name))
            os.chmod(os.path.join(task_dir, name), 0o644)

        if isolation == "bwrap" or uid is not None:
            processes = limits.max_processes
        else:
            processes = limits.max_processes + _count_processes(os.getuid())
        cand_limits = json.dumps(
            {
                "cpu_s": max(1, int(timeout_s + 0.999)),
                "memory_bytes": limits.memory_mb << 20,
                "file_bytes": limits.max_file_mb << 20,
                "open_files": limits.max_open_files,
                "processes": processes,
            }
        )
        if isolation == "bwrap":
            harness, cwd = "/task/_harness.py", "/"
            prefix = _bwrap_cmd(python, task_dir, limits)
        else:
            harness, cwd = os.path.join(task_dir, "_harness.py"), work
            prefix = _unshare_cmd() if isolation == "unshare" else []
        cmd = [*prefix, python, "-I", "-S", "-B", harness, str(req_r), str(rep_w), cand_limits]
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/tmp" if isolation == "bwrap" else work,
        }
        candidate = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            pass_fds=(req_r, rep_w),
            cwd=cwd,
            env=env,
            start_new_session=True,
            user=uid,
            group=uid,
            extra_groups=[] if uid is not None else None,
        )
        judge = subprocess.Popen(
            [python, "-I", "-S", "-B", str(_HERE / "_judge.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(req_w, rep_r),
            cwd=private,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True,
        )
        while fds:
            os.close(fds.pop())
        job = {
            "program": program,
            "prompt": prompt,
            "test": test,
            "entry_point": entry_point,
            "all_asserts": all_asserts,
            "timeout_s": timeout_s,
            "req_fd": req_w,
            "rep_fd": rep_r,
            "max_reply_bytes": limits.max_reply_mb << 20,
        }
        timed_out = False
        try:
            raw, _ = judge.communicate(json.dumps(job).encode(), timeout=timeout_s + _JUDGE_GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(judge)
            raw, _ = judge.communicate()
        verdict = _read_verdict(raw)
        # The judge has closed its end: the candidate flushes its output and exits, and its
        # exit status says how it ended. Past that, whatever it still does no longer matters.
        if not timed_out:
            with contextlib.suppress(subprocess.TimeoutExpired):
                candidate.wait(timeout=_EXIT_GRACE_S)
        if candidate.poll() is None:
            _kill_tree(candidate)
        rc = candidate.wait()
        if uid is not None and isolation != "bwrap":
            _kill_uid(python, uid)
        output = _read_head(out_path, limits.max_output_chars)
        result = _classify(verdict, rc, timed_out, isolation, output)
        result.extra["uid"] = uid
        return result
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for proc in (candidate, judge):
            if proc is not None and proc.poll() is None:
                _kill_tree(proc)
                proc.wait()
        shutil.rmtree(task_dir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to exit; True if it did.

    A pidfd wakes up the moment the child exits (``Popen.wait(timeout)`` polls with sleeps
    of up to 50 ms, a large share of a 100 ms run).
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(pidfd)


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()


def _read_head(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit * 4 + 4)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit or os.path.getsize(path) > len(data):
        text = text[:limit] + "\n...[truncated]"
    return text


def _read_verdict(raw: bytes) -> dict[str, Any]:
    """The judge's verdict (its last JSON line), or ``{}`` when it wrote none."""
    for line in reversed(raw.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return obj
    return {}


def _signal_of(rc: int, isolation: str) -> int | None:
    if rc < 0:
        return -rc
    if isolation in ("bwrap", "unshare") and rc > 128:
        return rc - 128
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _classify(
    verdict: dict[str, Any], rc: int, timed_out: bool, isolation: str, output: str
) -> CodeResult:
    event = verdict.get("event")
    n_pass, n_fail, n_static = (
        _int(verdict.get("passed")),
        _int(verdict.get("failed")),
        _int(verdict.get("static")),
    )
    total = max(n_pass + n_fail, n_static)
    fraction = n_pass / total if total else 0.0
    counts = {"asserts_passed": n_pass, "asserts_total": total, "output": output}
    if event == "done" and not timed_out and n_fail == 0:
        return CodeResult(True, "passed", fraction=1.0, message="check returned", **counts)
    sig = _signal_of(rc, isolation)
    if timed_out or event == "timeout" or sig == signal.SIGXCPU:
        what = "CPU time limit" if sig == signal.SIGXCPU else "wall-clock timeout"
        return CodeResult(False, "timeout", fraction, message=what, **counts)
    if not verdict:
        return CodeResult(
            False, "sandbox_error", 0.0, message=f"the judge gave no verdict (candidate exit {rc})",
            output=output,
        )  # fmt: skip
    phase = verdict.get("phase", "?")
    detail = f"{phase}: {verdict.get('type', '?')}: {verdict.get('msg', '')}"
    if event == "failed":
        return CodeResult(False, "failed", fraction, message=detail, **counts)
    if event == "memory":
        return CodeResult(False, "memory", fraction, message=detail, **counts)
    if event == "exit":
        return CodeResult(False, "error", fraction, message=f"{phase}: exited early", **counts)
    if event == "unsupported":
        return CodeResult(False, "sandbox_error", fraction, message=detail, **counts)
    if event == "gone" and sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return CodeResult(False, "killed", fraction, message=f"{phase}: killed by {name}", **counts)
    if event == "gone":
        return CodeResult(
            False, "error", fraction, message=f"{phase}: exited (code {rc}) before the tests completed",
            **counts,
        )  # fmt: skip
    return CodeResult(False, "error", fraction, message=detail, **counts)
