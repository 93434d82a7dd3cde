"""Answer extraction and equivalence for math problems (GSM8K, MATH).

``is_equivalent`` first compares cheap normal forms (exact rational arithmetic on numbers,
LaTeX clean-up on the rest). Only what that cannot decide goes to a symbolic check
(math-verify on sympy), which runs in a separate worker process with a time limit: a
check that takes too long kills the worker and counts as not equivalent.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 5.0

# --------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_HASHES = re.compile(r"####\s*([^\n]*)")
_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)


def tag_blocks(
    text: str, open_tag: str | re.Pattern[str], close_tag: str | re.Pattern[str]
) -> list[str]:
    """What ``re.findall(open + "(.*?)" + close, text, re.DOTALL)`` returns, in linear time
    (the lazy pattern rescans the rest of the text from every unclosed opening tag)."""
    find_open = re.compile(re.escape(open_tag)) if isinstance(open_tag, str) else open_tag
    find_close = re.compile(re.escape(close_tag)) if isinstance(close_tag, str) else close_tag
    blocks, pos = [], 0
    while (start := find_open.search(text, pos)) is not None:
        end = find_close.search(text, start.end())
        if end is None:  # no later opening tag can be closed either
            break
        blocks.append(text[start.end() : end.start()])
        pos = end.end()
    return blocks


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start]``, or None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_boxed(text: str, max_tries: int = 64) -> str | None:
    """Content of the last well-formed ``\\boxed``/``\\fbox`` (at most ``max_tries`` tried)."""
    for m in list(_BOXED.finditer(text))[::-1][:max_tries]:
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            inner = _braced(text, i)
            if inner is not None and inner.strip():
                return inner.strip()
        elif i > m.end():
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def _clean_tail(answer: str) -> str:
    answer = answer.strip()
    while answer and answer[-1] in ".;,":
        answer = answer[:-1].rstrip()
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: last ``\\boxed``/``\\fbox``, else ``#### N``, else
    ``<answer>...</answer>``, else "the answer is ..."; None when there is none."""
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _OPEN_TAG, _ANSWER_IS):
        if pattern is _OPEN_TAG:
            found = tag_blocks(text, _OPEN_TAG, _CLOSE_TAG)
        else:
            found = [m.group(1) for m in pattern.finditer(text)]
        matches = [m for m in map(_clean_tail, found) if m]
        if matches:
            answer = matches[-1]
            if pattern is _HASHES:
                number = re.match(r"\$?\s*[-+]?[\d,]*\.?\d+(?:/\d+)?", answer)
                answer = number.group(0) if number else answer
            if pattern is _ANSWER_IS:
                answer = _clean_tail(re.split(r"\.\s", answer, maxsplit=1)[0]).strip("$ ")
            return answer or None
    return None


# --------------------------------------------------------------------------- normal forms

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"^(-?[\d.,/]+)\s*[a-zA-Z]{1,20}\.?(?:\s+[a-zA-Z]{1,20}\.?){0,2}$")
_ASSIGN = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_MIXED = re.compile(r"^(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$|^(-?)(\d+)\s+(\d+)/(\d+)$")


def normalize(answer: str) -> str:
    """A canonical string form: no ``$``, ``\\left``/``\\right``, ``\\text{}``, degree marks,
    thousands commas, spaces or a leading ``x=``; ``\\dfrac``/``\\tfrac`` become ``\\frac``."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)\b\s*", "", s)
    s = re.sub(r"\\[!,;: ]", " ", s).replace("~", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for _ in range(3):
        s = _TEXT_CMD.sub(r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = re.sub(r"\\?%", "", s)
    s = s.strip()
    m = _ASSIGN.match(s)
    if m and "," not in s:
        s = m.group(1).strip()
    m = _UNIT_WORDS.match(s)
    if m:
        s = m.group(1)
    s = _clean_tail(s)
    if _THOUSANDS.match(s.replace(" ", "")):
        s = s.replace(",", "")
    if _MIXED.match(s):
        return s
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    return s


def to_number(answer: str) -> Fraction | None:
    """The exact value of a plain number (integer, decimal, ``a/b``, ``\\frac{a}{b}``, mixed
    number) after :func:`normalize`, else None."""
    s = normalize(answer)
    m = _MIXED.match(s)
    if m:
        g = [x for x in m.groups() if x is not None]
        sign, whole, num, den = g[0], int(g[1]), int(g[2]), int(g[3])
        if den == 0:
            return None
        value = whole + Fraction(num, den)
        return -value if sign else value
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    elif s.startswith("+"):
        s = s[1:]
    m = re.fullmatch(
        r"\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}|(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s
    )
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if Fraction(den) == 0:
            return None
        return sign * Fraction(num) / Fraction(den)
    if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
        return sign * Fraction(s)
    return None


# --------------------------------------------------------------------------- symbolic check


def _serve() -> None:
    """Worker process: read JSON ``[pred, gold]`` lines on stdin, answer ``true``/``false``.

    math-verify runs with its own timeouts off (they use signals or threads); the parent
    enforces the time limit by killing this process.
    """
    import logging
    import warnings

    proto = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    from math_verify import parse, verify

    verify(
        parse("$x+1$", parsing_timeout=None),
        parse("$1+x$", parsing_timeout=None),
        timeout_seconds=None,
    )
    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            g = parse(f"${gold}$", parsing_timeout=None)
            p = parse(f"${pred}$", parsing_timeout=None)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
        except BaseException:  # sympy raises almost anything on junk
            ok = False
        proto.write("true\n" if ok else "false\n")
        proto.flush()


class SymbolicChecker:
    """A persistent worker process for symbolic equality, restarted after a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from actors.verifiers.math import _serve; _serve()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._proc = proc
        if self._readline(120.0) != "ready":
            self._stop()
            raise RuntimeError("symbolic checker did not start")

    def _readline(self, timeout_s: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return line.strip() if line else None

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
        self._proc = None

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        """Symbolic equivalence of two answers; False on timeout or any error."""
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write(json.dumps([pred, gold]) + "\n")
                self._proc.stdin.flush()
                answer = self._readline(timeout_s)
                if answer in ("true", "false"):
                    return answer == "true"
            except (OSError, ValueError, RuntimeError):
                pass
            self._stop()
            self.restarts += 1
            return False

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._stop()


_CHECKER = SymbolicChecker()
atexit.register(_CHECKER.close)
_BASE_N = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")


def _base_value(m: re.Match[str]) -> int | None:
    """Value of a number written in base ``b`` as ``digits_b`` (e.g. ``52_8``)."""
    try:
        return int(m.group(1), int(m.group(2)))
    except ValueError:
        return None


def _strip_outer(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def is_equivalent(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer ``pred`` equals answer ``gold`` (numbers exactly, expressions, sets,
    intervals and tuples symbolically within ``timeout_s``). Never raises; junk is False."""
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        pred, gold = _strip_outer(pred), _strip_outer(gold)
        if not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        np_, ng = normalize(pred), normalize(gold)
        if np_ and np_ == ng:
            return True
        bp, bg = _BASE_N.match(np_), _BASE_N.match(ng)
        if bp or bg:
            value = _base_value(bp) if bp and bg else None
            return value is not None and value == _base_value(bg)
        vp, vg = to_number(pred), to_number(gold)
        if vp is not None and vg is not None:
            return vp == vg
        return _CHECKER.check(pred, gold, timeout_s)
    except Exception:
        return False
