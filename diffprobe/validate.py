"""Checks for values a user passes in (CLI flags, constructor arguments), each failing with one
DiffprobeError that names the argument and what it expects.

Python's own errors for a wrong type or value surface deep inside torch (`TypeError: empty()
received an invalid combination of arguments`), after work has started; these run first.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import DiffprobeError


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """An integer ≥ minimum (bools and floats with a fraction are refused; 3.0 is 3)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)) or (isinstance(value, float) and not value.is_integer()):
        raise DiffprobeError(f"{name}: expected an integer ≥ {minimum}, got {value!r}")
    if int(value) < minimum:
        raise DiffprobeError(f"{name} must be ≥ {minimum}, got {int(value)}")
    return int(value)


def finite_float(value: Any, name: str, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None, below: float | None = None) -> float:  # fmt: skip
    """A finite real number within the given bounds (minimum/maximum inclusive, above/below exclusive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DiffprobeError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DiffprobeError(f"{name} must be a finite number, got {value}")
    for bound, ok, word in ((minimum, lambda b: value >= b, "≥"), (above, lambda b: value > b, ">"),
                            (maximum, lambda b: value <= b, "≤"), (below, lambda b: value < b, "<")):  # fmt: skip
        if bound is not None and not ok(bound):
            raise DiffprobeError(f"{name} must be {word} {bound:g}, got {value:g}")
    return value


def known_keywords(given: dict[str, Any], known: set[str] | dict[str, Any], what: str) -> None:
    """Refuse keyword arguments nobody reads, suggesting the nearest known name (a typo is not a default)."""
    import difflib

    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, list(known), 1)) else repr(u) for u in unknown]
        raise DiffprobeError(f"unknown {what} {', '.join(hints)}; expected one of {', '.join(sorted(known))}")
