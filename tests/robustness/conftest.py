from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.robustness.hostile import Valid, make_valid, tree_digest


@pytest.fixture(scope="session")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Valid]:
    """The valid world every hostile case is combined with; checked unchanged at the end
    (GUIDE §2: an input is never modified)."""
    v = make_valid(tmp_path_factory.mktemp("valid"))
    before = tree_digest(v.root)
    yield v
    assert tree_digest(v.root) == before, "a command modified one of its valid inputs"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(input folder, output folder), both empty."""
    i, o = tmp_path / "in", tmp_path / "out"
    i.mkdir()
    o.mkdir()
    return i, o
