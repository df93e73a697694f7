"""Argument shapes for library callers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def one_or_many(value: T | Iterable[T] | None) -> list[T] | None:
    """A single str or path as a one-item list (a str is also a sequence, of characters: without
    this, ``include="encoder.*"`` would be nine patterns and ``merge_adapters(b, "ad")`` two
    adapters "a" and "d") and a single number (one weight) as a one-item list; None stays None;
    any other iterable becomes a list."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Iterable):
        return [value]  # type: ignore[list-item]
    return list(value)  # type: ignore[arg-type]
