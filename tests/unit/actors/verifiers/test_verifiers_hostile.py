"""Hostile programs: each must fail with the right status, leave the host untouched and
leave the scorer working. Namespace-level checks need bubblewrap (installed by CI)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.verifiers.code import (
    CodeResult,
    IsolationWarning,
    available,
    run_tests,
    sandbox_processes,
)
from actors.verifiers.pool import run_many

pytestmark = pytest.mark.integration

BWRAP = available("bwrap")
needs_bwrap = pytest.mark.skipif(
    not BWRAP, reason="bubblewrap cannot run here (fallback covered elsewhere)"
)
IS_ROOT = os.geteuid() == 0

ONE_TEST = "def check(candidate):\n    assert candidate() == 1\n"
FLOAT_TEST = "import math\n\ndef check(candidate):\n    assert abs(candidate() - 0.5) < 1e-6\n    assert math.isclose(candidate(), 0.5)\n"


def _mode() -> str:
    return "bwrap" if BWRAP else "rlimit"


def _run(
    program: str, test: str = ONE_TEST, timeout_s: float = 3.0, mode: str | None = None
) -> CodeResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        return run_tests(program, test, "f", timeout_s=timeout_s, mode=mode or _mode())


def _no_stray_processes(res: CodeResult) -> None:
    """No live process is left under the run's throwaway uid (root scorers only)."""
    uid = res.extra.get("uid")
    if not IS_ROOT or uid is None:
        return
    deadline = time.monotonic() + 5
    while sandbox_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes(uid) == []


def _scorer_still_works(mode: str | None = None) -> None:
    ok = _run("def f():\n    return 1\n", mode=mode)
    assert ok.passed and ok.status == "passed"


@pytest.fixture
def sentinel() -> Iterator[subprocess.Popen]:
    """A host process the sandboxed program must not be able to kill."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


EXIT_TRICKS = {
    "sys_exit_top": ("import sys\nsys.exit(0)\ndef f():\n    return 1\n", "error"),
    "os_exit_top": ("import os\nos._exit(0)\ndef f():\n    return 1\n", "error"),
    "raise_systemexit_in_candidate": ("def f():\n    raise SystemExit(0)\n", "error"),
    "os_exit_in_candidate": ("import os\ndef f():\n    os._exit(0)\n", "error"),
    "exit_builtin": ("def f():\n    exit()\n", "error"),
    "print_pass_then_exit": (
        "import os\nprint('PASS')\nprint('all tests passed')\nos._exit(0)\n",
        "error",
    ),
    "kill_self": (
        "import os, signal\ndef f():\n    os.kill(os.getpid(), signal.SIGKILL)\n",
        "killed",
    ),
    "killpg_own_group": (
        "import os, signal\nos.killpg(0, signal.SIGKILL)\ndef f():\n    return 1\n",
        "killed",
    ),
    "forge_done_event": (
        "import os, json\n"
        "msg = json.dumps({'event': 'done', 'token': 'f' * 32, 'passed': 1, 'failed': 0, 'static': 1})\n"
        "for fd in range(1, 32):\n"
        "    try:\n"
        "        os.write(fd, (msg + '\\n').encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n",
        "error",
    ),
    "patch_harness_os_functions": (
        "import os, json\nos.read = lambda fd, n: b'f' * 32\nos.write = lambda fd, b: len(b)\n"
        "os._exit = lambda code: None\njson.dumps = lambda obj: '{}'\n"
        "def f():\n    return 2\n",
        "failed",
    ),
    "atexit_print": (
        "import atexit\natexit.register(lambda: print('PASS'))\ndef f():\n    return 2\n",
        "failed",
    ),
    "always_equal_object": (
        "class A:\n    def __eq__(self, other):\n        return True\n\ndef f():\n    return A()\n",
        "error",
    ),
    "int_subclass_equal": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n\n"
        "def f():\n    return I(7)\n",
        "error",
    ),
    "thread_exits_during_check": (
        "import os, threading, time\n"
        "def f():\n    threading.Thread(target=lambda: os._exit(0)).start()\n    time.sleep(1)\n    return 2\n",
        "error",
    ),
}


@pytest.mark.parametrize("mode", sorted({_mode(), "rlimit"}))
@pytest.mark.parametrize("name", sorted(EXIT_TRICKS))
def test_exit_and_forgery_tricks_score_zero(name: str, mode: str) -> None:
    program, status = EXIT_TRICKS[name]
    res = _run(program, mode=mode)
    assert not res.passed and res.fraction < 1.0
    assert res.status == status, (res.status, res.message)
    assert res.isolation == mode
    _no_stray_processes(res)
    _scorer_still_works(mode=mode)


MONKEYPATCH_TRICKS = {
    "builtins_abs": "import builtins\nbuiltins.abs = lambda x: 0\nimport math\nmath.isclose = lambda *a, **k: True\ndef f():\n    return 3.0\n",
    "shadow_abs_global": "def abs(x):\n    return 0\ndef f():\n    return 3.0\n",
    "fake_math_module": (
        "import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
        "sys.modules['math'] = fake\nimport builtins\nbuiltins.__import__ = lambda *a, **k: fake\n"
        "def f():\n    return 3.0\n"
    ),
    "assertion_error_swap": "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\ndef f():\n    return 3.0\n",
    "settrace": "import sys\nsys.settrace(lambda *a: None)\ndef f():\n    return 3.0\n",
}


@pytest.mark.parametrize("name", sorted(MONKEYPATCH_TRICKS))
def test_monkeypatching_before_the_tests_scores_zero(name: str) -> None:
    res = _run(MONKEYPATCH_TRICKS[name], test=FLOAT_TEST)
    assert not res.passed and res.status == "failed", (res.status, res.message)
    honest = _run("def f():\n    return 0.5\n", test=FLOAT_TEST)
    assert honest.passed


def test_infinite_loop_times_out() -> None:
    res = _run("def f():\n    while True:\n        pass\n", timeout_s=1.5)
    assert res.status == "timeout" and not res.passed
    _no_stray_processes(res)
    _scorer_still_works()


def test_infinite_loop_at_import_in_a_child_times_out() -> None:
    res = _run("import os\nos.fork()\nwhile True:\n    pass\n", timeout_s=1.5)
    assert res.status == "timeout"
    _no_stray_processes(res)


def test_memory_bomb_is_stopped() -> None:
    res = _run("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n", timeout_s=10)
    assert res.status == "memory" and not res.passed
    _no_stray_processes(res)
    _scorer_still_works()


@pytest.mark.skipif(
    not (BWRAP or IS_ROOT), reason="the process limit needs a PID namespace or a throwaway uid"
)
def test_fork_bomb_is_bounded(sentinel: subprocess.Popen) -> None:
    bomb = "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\nf()\n"
    before = len([p for p in os.listdir("/proc") if p.isdigit()])
    res = _run(bomb, timeout_s=2.0)
    assert res.status == "timeout" and not res.passed
    _no_stray_processes(res)

    def count() -> int:
        return len([p for p in os.listdir("/proc") if p.isdigit()])

    # Killed forks linger until their parent reaps them, which on a loaded machine takes a
    # moment: wait (bounded) for the table to drain, then check nothing was left behind.
    deadline = time.monotonic() + 10
    while count() >= before + 16 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count() < before + 16
    assert sentinel.poll() is None
    _scorer_still_works()


@needs_bwrap
def test_daemonised_child_does_not_survive() -> None:
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\ndef f():\n    return 0\n"
    res = _run(prog)
    assert res.status == "failed"
    _no_stray_processes(res)


@needs_bwrap
def test_cannot_write_outside_the_sandbox() -> None:
    target_dir = Path(tempfile.mkdtemp(prefix="embr-outside-"))
    try:
        os.chmod(target_dir, 0o777)  # only the sandbox, not file permissions, may stop the write
        target = target_dir / "pwned.txt"
        repo_target = Path(__file__).resolve().parent / "pwned.txt"
        prog = (
            "def f():\n"
            f"    open({str(target)!r}, 'w').write('x')\n"
            f"    open({str(repo_target)!r}, 'w').write('x')\n"
            "    return 1\n"
        )
        res = _run(prog)
        assert not res.passed and res.status == "error"
        assert (
            "FileNotFoundError" in res.message
            or "PermissionError" in res.message
            or "OSError" in res.message
        )
        assert not target.exists() and not repo_target.exists()
        assert list(target_dir.iterdir()) == []
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)
    _scorer_still_works()


@needs_bwrap
def test_cannot_read_files_outside_the_sandbox() -> None:
    secret_dir = Path(tempfile.mkdtemp(prefix="embr-secret-"))
    try:
        os.chmod(secret_dir, 0o755)
        secret = secret_dir / "secret.txt"
        secret.write_text("top-secret-4242")
        os.chmod(secret, 0o644)  # world-readable: only the namespace hides it
        prog = (
            f"def f():\n    data = open({str(secret)!r}).read()\n    print(data)\n    return data\n"
        )
        test = "def check(candidate):\n    assert candidate() == 'top-secret-4242'\n"
        res = _run(prog, test=test)
        assert not res.passed and res.status == "error"
        assert "top-secret-4242" not in res.output
        here = _run(f"def f():\n    return open({str(Path(__file__).resolve())!r}).read()[:1]\n")
        assert here.status == "error"
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)
    _scorer_still_works()


@needs_bwrap
def test_no_network_to_host_listener() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        prog = (
            "import socket\n"
            "def f():\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'hello')\n"
            "    return 1\n"
        )
        res = _run(prog)
        assert not res.passed and res.status == "error"
        assert "ConnectionRefusedError" in res.message or "OSError" in res.message
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    _scorer_still_works()


@needs_bwrap
@pytest.mark.parametrize(
    "kill",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.kill(1, signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
    ],
)
def test_killing_the_parent_does_not_reach_the_scorer(
    kill: str, sentinel: subprocess.Popen
) -> None:
    prog = (
        f"import os, signal\ntry:\n    {kill}\nexcept OSError:\n    pass\ndef f():\n    return 0\n"
    )
    res = _run(prog)
    assert not res.passed and res.status == "failed", (res.status, res.message)
    assert sentinel.poll() is None
    _no_stray_processes(res)
    _scorer_still_works()


@pytest.mark.skipif(
    not IS_ROOT, reason="signal containment without namespaces needs a throwaway uid"
)
def test_fallback_kill_all_only_reaches_the_sandbox_uid(sentinel: subprocess.Popen) -> None:
    prog = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\ndef f():\n    return 0\n"
    res = _run(prog, mode="rlimit")
    assert res.status == "failed" and res.isolation == "rlimit"
    assert sentinel.poll() is None
    _scorer_still_works(mode="rlimit")


def test_pool_survives_a_burst_of_hostile_runs(sentinel: subprocess.Popen) -> None:
    honest = "def f():\n    return 1\n"
    programs = [trick for trick, _ in EXIT_TRICKS.values()] + [honest]
    programs += ["def f():\n    while True:\n        pass\n", honest]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        results = run_many([(p, ONE_TEST, "f") for p in programs], 2, timeout_s=2.0, mode=_mode())
    expected = [False] * len(EXIT_TRICKS) + [True, False, True]
    assert [r.passed for r in results] == expected
    assert [r.status for r in results[len(EXIT_TRICKS) :]] == ["passed", "timeout", "passed"]
    for r in results:
        _no_stray_processes(r)
    assert sentinel.poll() is None


FILL_EVERYTHING = r"""
import os

def fill(directory):
    total = 0
    for i in range(64):
        try:
            with open(f"{directory}/fill{i}", "wb") as fh:
                while True:
                    fh.write(b"x" * (1 << 20))
                    fh.flush()
                    total += 1
        except BaseException:
            pass
    return total

for place in ("/dev/shm", "/dev", "/tmp", ".", "/var/tmp", "/run", "/task"):
    print(f"{place} {fill(place)}")
memfd = 0
try:
    for i in range(64):
        fd = os.memfd_create(f"fill{i}")
        while True:
            os.write(fd, b"x" * (1 << 20))
            memfd += 1
except BaseException:
    pass
print(f"memfd {memfd}")

def f():
    return 0
"""


@needs_bwrap
def test_every_writable_place_is_bounded() -> None:
    """/dev/shm, /dev, /tmp, the working directory and memfds: none grows past its limit."""
    from actors.verifiers.code import SandboxLimits

    limits = SandboxLimits(tmpfs_mb=8, max_file_mb=4, max_open_files=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        res = run_tests(FILL_EVERYTHING, ONE_TEST, "f", timeout_s=20, mode="bwrap", limits=limits)
    assert res.status == "failed", (res.status, res.message, res.output)
    written = {line.split()[0]: int(line.split()[1]) for line in res.output.splitlines() if line}
    assert set(written) == {"/dev/shm", "/dev", "/tmp", ".", "/var/tmp", "/run", "/task", "memfd"}
    assert written["/dev/shm"] <= limits.tmpfs_mb and written["/tmp"] <= limits.tmpfs_mb
    assert written["."] <= limits.tmpfs_mb  # the working directory is /tmp
    assert written["/dev"] == written["/var/tmp"] == written["/run"] == written["/task"] == 0
    assert written["memfd"] <= limits.max_open_files * limits.max_file_mb
    _no_stray_processes(res)
