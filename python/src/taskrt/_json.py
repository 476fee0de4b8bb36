"""JSON as the runtime reads it: strict (no NaN/Infinity, valid UTF-8, no lone surrogates).

Python's :mod:`json` writes ``NaN`` and lone surrogates (``"\\ud800"``) that the runtime's
parser refuses; a value with one of them must fail here, naming where it is, rather than at
the node (a ``400``) or - for a worker's result - as a protocol error that kills the process.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "find_problem", "roundtrip"]


#: What ``json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))``
#: builds per call, built once (it keeps no state between calls).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Compact JSON text of ``value``; raises ``TypeError``/``ValueError`` when it has no
    strict JSON form (use :func:`find_problem` for where)."""
    if value is None:
        return "null"
    text = _ENCODER.encode(value)
    # Lone surrogates survive ensure_ascii=False and only fail here (ASCII text has none).
    if not text.isascii():
        text.encode("utf-8")
    return text


def _describe(value: Any) -> str:
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def find_problem(value: Any, where: str, depth: int = 0) -> str | None:
    """Where and why ``value`` is not strict JSON (``args[1]['when']: a datetime is not
    JSON-serialisable``), or ``None`` when it is."""
    if depth > 200:
        return f"{where}: nested more than 200 levels deep"
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{where}: {value!r} is not a JSON number"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where}: the string holds a lone surrogate at index {exc.start}"
        return None
    if isinstance(value, (list, tuple)):
        for n, item in enumerate(value):
            problem = find_problem(item, f"{where}[{n}]", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"{where}: a key of type {type(key).__name__} is not JSON-serialisable"
            if isinstance(key, str):
                problem = find_problem(key, f"{where} key {key!r}", depth + 1)
                if problem:
                    return problem
            problem = find_problem(item, f"{where}[{key!r}]", depth + 1)
            if problem:
                return problem
        return None
    return f"{where}: {_describe(value)} is not JSON-serialisable"


def roundtrip(value: Any, where: str, error: type[Exception] = TypeError) -> Any:
    """``value`` as the other side will see it (tuples become lists, int keys strings), or
    ``error`` naming the place that cannot be sent."""
    try:
        return json.loads(dumps(value))
    except (TypeError, ValueError, RecursionError) as exc:
        problem = find_problem(value, where) or f"{where}: not JSON-serialisable ({exc})"
        raise error(problem) from None
