"""Select tensors or modules by glob patterns, with a report of what matched."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from lorasurgeon.errors import MatchError

# Embedding tables by their usual names: not factorized or LoRA-extracted unless named by
# --include (a lookup table, not a matrix product; PEFT holds embedding LoRA differently).
EMBEDDINGS = ("*embed*", "*wte*", "*wpe*")


def default_excluded(name: str, include: Sequence[str] | None) -> bool:
    """An embedding table (``EMBEDDINGS``) that no --include pattern names."""
    return any(matches(name, p) for p in EMBEDDINGS) and not any(matches(name, p) for p in (include or []))


def module_of(tensor_name: str) -> str:
    """``encoder.layer.0.attention.self.query.weight`` -> ``encoder.layer.0.attention.self.query``."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def matches(name: str, pattern: str) -> bool:
    """A glob matches a tensor name or the name of the module that holds it."""
    return fnmatchcase(name, pattern) or fnmatchcase(module_of(name), pattern)


@dataclass
class Selection:
    selected: list[str]
    unmatched_patterns: list[str] = field(default_factory=list)


def select(
    names: Iterable[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    allow_unmatched: bool = False,
    what: str = "tensor",
    can_allow: bool = True,
) -> Selection:
    """Keep names matching any ``include`` glob (all when none) and no ``exclude`` glob.

    Raises:
        MatchError: a pattern matches nothing (PEFT silently ignores typos; we do not),
            unless ``allow_unmatched``; ``can_allow`` False when the command has no
            --allow-unmatched to suggest.
    """
    names = list(names)
    unmatched: list[str] = []
    for flag, pats in (("--include", include or []), ("--exclude", exclude or [])):
        for p in pats:
            if not any(matches(n, p) for n in names):
                unmatched.append(f"{flag} {p!r}")
    if unmatched and not allow_unmatched:
        raise MatchError(
            f"{', '.join(unmatched)} matches no {what}; check the pattern (globs over names, e.g. '*.attention.*')"
            + (" or pass --allow-unmatched" if can_allow else "")
        )
    out = [
        n
        for n in names
        if (not include or any(matches(n, p) for p in include)) and not any(matches(n, p) for p in (exclude or []))
    ]
    return Selection(out, unmatched)
