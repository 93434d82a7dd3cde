"""Plain data across the sandbox boundary: builtin values as one JSON line, nothing else.

Standard library only (loaded by both sides of the sandbox under ``python -I -S``).
:func:`encode` accepts only the exact builtin types (no subclass, so no custom ``__eq__``
or ``__hash__``); :func:`decode` builds only builtin values, whatever the text says.
JSON arrays are lists; every other container is a one-key object naming its type.
"""

import json

MAX_DEPTH = 64
# Bound at import: a program that patches the json module does not reach these.
_dumps, _loads = json.dumps, json.loads
_TAGS = ("tuple", "dict", "set", "frozenset", "complex", "bytes", "float")


def encode(value: object) -> bytes:
    """``value`` as one JSON line (raises ``TypeError`` for anything but plain builtins)."""
    return _dumps(_enc(value, 0), separators=(",", ":")).encode() + b"\n"


def _enc(x: object, depth: int) -> object:
    if depth > MAX_DEPTH:
        raise TypeError(f"value nested deeper than {MAX_DEPTH}")
    kind = type(x)
    if x is None or kind is bool or kind is int or kind is str:
        return x
    if kind is float:
        return x if x == x and x not in (float("inf"), float("-inf")) else {"float": repr(x)}
    if kind is list:
        return [_enc(v, depth + 1) for v in x]  # type: ignore[attr-defined]
    if kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [_enc(v, depth + 1) for v in x]}  # type: ignore[attr-defined]
    if kind is dict:
        items = x.items()  # type: ignore[attr-defined]
        return {"dict": [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in items]}
    if kind is complex:
        return {"complex": [_enc(x.real, depth + 1), _enc(x.imag, depth + 1)]}  # type: ignore[attr-defined]
    if kind is bytes:
        return {"bytes": x.hex()}  # type: ignore[attr-defined]
    raise TypeError(f"not plain data: {kind.__name__}")


def decode(line: bytes) -> object:
    """The value of one :func:`encode` line (raises ``ValueError`` on anything else)."""
    try:
        return _dec(_loads(line), 0)
    except (TypeError, KeyError, IndexError, RecursionError, OverflowError) as exc:
        raise ValueError(f"not a plain value: {type(exc).__name__}") from None


def _dec(x: object, depth: int) -> object:  # noqa: C901, PLR0912  (one branch per tagged builtin type of the codec)
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    kind = type(x)
    if x is None or kind in (bool, int, float, str):
        return x
    if kind is list:
        return [_dec(v, depth + 1) for v in x]  # type: ignore[attr-defined]
    if kind is not dict or len(x) != 1:  # type: ignore[arg-type]
        raise ValueError("malformed value")
    ((tag, body),) = x.items()  # type: ignore[attr-defined]
    if tag not in _TAGS:
        raise ValueError(f"unknown tag {tag!r}")
    if tag == "float":
        if body not in ("nan", "inf", "-inf"):
            raise ValueError("bad float")
        return float(body)
    if tag == "bytes":
        if type(body) is not str:
            raise ValueError("bad bytes")
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"bad {tag}")
    items = [_dec(v, depth + 1) for v in body]
    if tag == "tuple":
        return tuple(items)
    if tag == "set":
        return set(items)
    if tag == "frozenset":
        return frozenset(items)
    if tag == "complex":
        if len(items) != 2 or not all(type(v) is float or type(v) is int for v in items):
            raise ValueError("bad complex")
        return complex(items[0], items[1])  # type: ignore[arg-type]
    out = {}
    for pair in items:
        if type(pair) is not list or len(pair) != 2:  # type: ignore[arg-type]
            raise ValueError("bad dict item")
        out[pair[0]] = pair[1]  # type: ignore[index]
    return out
