"""Argument checks shared by the model constructors: they raise :class:`ModelError` saying what to fix."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from segpipe.core.errors import ModelError


def positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1 (bools refused), else raise ModelError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{owner}: '{name}' must be a positive integer, got {value!r}; pass e.g. {name}=16")
    return value


def one_of(owner: str, name: str, value: Any, choices: Collection[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ModelError listing them."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ModelError(f"{owner}: '{name}' must be one of {allowed}, got {value!r}")
    return value


def divisible(owner: str, name: str, value: int, by_name: str, by: int) -> None:
    """Raise ModelError unless ``value`` is a multiple of ``by``."""
    if value % by:
        raise ModelError(
            f"{owner}: '{name}' ({value}) must be a multiple of '{by_name}' ({by}); change one of them"
        )
