"""Sizes for people: one formatting for the CLI's tables and the library's log lines."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1000-based: ``512 B``, ``49.7 KB``, ``90.9 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
