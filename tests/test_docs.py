"""Every shell example in docs/ marked `<!-- runnable -->` runs and exits 0 (in order, per page)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- runnable -->\s*```sh\n(.*?)```", re.S)
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if BLOCK.search(p.read_text(encoding="utf-8")))


@pytest.mark.slow  # about a minute of training examples; `make test-all` runs it
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_runnable_examples(page: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from make_usage import env
    finally:
        sys.path.pop(0)
    e = env()
    for block in BLOCK.findall(page.read_text(encoding="utf-8")):
        p = subprocess.run(["bash", "-ec", block], cwd=tmp_path, env=e, capture_output=True, text=True)
        assert p.returncode == 0, f"{page.name}: {block}\n{p.stderr[-2000:]}"


def test_there_are_runnable_examples() -> None:
    assert any(p.name == "usage.md" for p in PAGES)
