"""Sandboxed test execution: outcomes, fractions, fallbacks and configuration."""

from __future__ import annotations

import warnings

import pytest

from actors.verifiers import code as code_mod
from actors.verifiers.code import (
    STATUSES,
    CodeResult,
    IsolationError,
    IsolationWarning,
    SandboxLimits,
    available,
    resolve_mode,
    run_tests,
)

pytestmark = pytest.mark.integration

ADD_TEST = """
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(2, 2) == 4
    assert candidate(0, 5) == 5
    assert candidate(-1, 1) == 0
"""
GOOD = "def add(a, b):\n    return a + b\n"
HALF = "def add(a, b):\n    return 99 if a == 0 else a + b\n"


def _modes() -> list[str]:
    modes = ["rlimit"]
    if available("unshare"):
        modes.append("unshare")
    if available("bwrap"):
        modes.append("bwrap")
    return modes


@pytest.fixture(params=_modes())
def mode(request: pytest.FixtureRequest) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        resolve_mode(request.param)
    return request.param


def _run(program: str, mode: str, **kw: object) -> CodeResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        return run_tests(program, ADD_TEST, "add", mode=mode, **kw)  # type: ignore[arg-type]


def test_pass_and_fail(mode: str) -> None:
    ok = _run(GOOD, mode)
    assert ok.passed and ok.status == "passed" and ok.fraction == 1.0
    assert ok.asserts_passed == ok.asserts_total == 4
    assert ok.isolation == mode
    bad = _run("def add(a, b):\n    return a - b\n", mode)
    assert not bad.passed and bad.status == "failed" and bad.fraction == 0.0


def test_fraction_counts_every_assert_when_asked(mode: str) -> None:
    first_stop = _run(HALF, mode)
    assert first_stop.status == "failed" and first_stop.asserts_total == 4
    assert first_stop.fraction == pytest.approx(2 / 4)
    every = _run(HALF, mode, all_asserts=True)
    assert every.status == "failed" and not every.passed
    assert (every.asserts_passed, every.asserts_total) == (3, 4)
    assert every.fraction == pytest.approx(3 / 4)


def test_error_statuses(mode: str) -> None:
    syntax = _run("def add(a, b) return a\n", mode)
    assert syntax.status == "error" and "SyntaxError" in syntax.message
    missing = _run("def plus(a, b):\n    return a + b\n", mode)
    assert missing.status == "error" and "add" in missing.message
    raises = _run("def add(a, b):\n    raise ValueError('boom')\n", mode)
    assert raises.status == "error" and "ValueError" in raises.message
    loop = _run("def add(a, b):\n    while True:\n        pass\n", mode, timeout_s=1.5)
    assert loop.status == "timeout" and not loop.passed
    memory = _run("blob = bytearray(4 << 30)\n" + GOOD, mode, timeout_s=5)
    assert memory.status == "memory" and not memory.passed
    for r in (syntax, missing, raises, loop, memory):
        assert r.status in STATUSES


def test_output_is_captured_and_truncated() -> None:
    prog = "print('hello from the program')\nprint('x' * 100000)\n" + GOOD
    res = run_tests(prog, ADD_TEST, "add", limits=SandboxLimits(max_output_chars=200))
    assert res.passed
    assert res.output.startswith("hello from the program")
    assert res.output.endswith("[truncated]") and len(res.output) < 300


def test_main_guard_does_not_run_and_stdin_is_closed() -> None:
    prog = (
        GOOD
        + "if __name__ == '__main__':\n    raise SystemExit(3)\nimport sys\nassert sys.stdin.read() == ''\n"
    )
    assert run_tests(prog, ADD_TEST, "add").passed


def test_bad_inputs_never_raise() -> None:
    assert run_tests(None, ADD_TEST, "add").status == "error"  # type: ignore[arg-type]
    assert run_tests(GOOD, ADD_TEST, "not an identifier").status == "error"
    assert run_tests(GOOD, "def check(candidate:\n", "add").status == "error"
    assert run_tests(GOOD, "x = 1\n", "add").status == "error"  # no check()
    assert run_tests("\x00", ADD_TEST, "add").status == "error"


def test_require_isolation_turns_fallback_into_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(code_mod._DETECTED, "bwrap", False)
    with pytest.raises(IsolationError):
        resolve_mode("auto", require_isolation=True)
    with pytest.raises(IsolationError):
        run_tests(GOOD, ADD_TEST, "add", require_isolation=True)
    monkeypatch.setattr(code_mod, "_WARNED", set())
    with pytest.warns(IsolationWarning):
        res = run_tests(GOOD, ADD_TEST, "add")
    assert res.passed and res.isolation in ("unshare", "rlimit")
    with pytest.raises(ValueError):
        resolve_mode("docker")
    with pytest.raises(IsolationError, match="conflicts"):
        resolve_mode("rlimit", require_isolation=True)


def test_config_builds_code_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors.verifiers import CodeVerifier, build_verifier
    from embr_rl.core.config import ConfigError, load_config

    cfg = load_config(None, ["verifier.code.reward=fraction", "verifier.code.timeout_s=3"])
    verifier = build_verifier("code", cfg.verifier)
    assert isinstance(verifier, CodeVerifier) and verifier.reward == "fraction"
    ref = {"test": ADD_TEST, "entry_point": "add"}
    score = verifier.score(f"```python\n{HALF}```", ref)
    assert score.reward == pytest.approx(0.75) and score.outcome == "failed"
    assert verifier.score(GOOD, ref).reward == 1.0
    with pytest.raises(ConfigError, match=r"verifier\.code\.sandbox"):
        load_config(None, ["verifier.code.sandbox=docker"])
    monkeypatch.setitem(code_mod._DETECTED, "bwrap", False)
    strict = load_config(None, ["verifier.code.require_isolation=true"])
    with pytest.raises(IsolationError):
        build_verifier("code", strict.verifier)
