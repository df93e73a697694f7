"""Same inputs and seed give byte-identical outputs wherever the files lie (GUIDE §2): every
writing command runs twice, the second time on copies of its inputs in another folder, writing to
another folder; every file of the two outputs must be equal, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.robustness.hostile import Valid, invoke, temp_leftovers
from tests.robustness.writers import WRITER_BY_ID, WRITERS, Writer, copy_valid, params, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _run(w: Writer, v: Valid, out_dir: Path) -> dict[str, bytes]:
    out_dir.mkdir(parents=True)
    res = invoke(w.argv(v, out_dir / w.out_name))
    assert res.code == 0, res.stderr
    assert temp_leftovers(out_dir) == []
    snap = snapshot(out_dir)  # every file in the output folder (export writes adapter files beside its output)
    assert w.out_name in {n.split("/")[0] for n in snap}, "no output written"
    return snap


# Every command in the fast suite; its other option sets (DARE's seeded masks among them) slow.
@pytest.mark.parametrize("writer", params(WRITERS, lambda w: w.variant))
def test_twice_byte_identical_wherever_the_files_lie(writer: Writer, valid: Valid, tmp_path: Path) -> None:
    first = _run(writer, valid, tmp_path / "one")
    elsewhere = copy_valid(valid, tmp_path / "moved" / "inputs")
    second = _run(writer, elsewhere, tmp_path / "two" / "deeper")
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs"
    # No absolute path of ours leaks into what we write.
    for name, data in first.items():
        assert os.fsencode(tmp_path) not in data, f"{name} records a path"


@pytest.mark.slow
@pytest.mark.parametrize("writer_id", ["factorize", "merge", "compose-dare-ties", "extract"])
def test_subprocess_matches_in_process(writer_id: str, valid: Valid, tmp_path: Path) -> None:
    """The console script in a fresh process (its own thread pool, import order, hash seed) writes
    the same bytes as the in-process run."""
    w = WRITER_BY_ID[writer_id]
    ref = _run(w, valid, tmp_path / "in-process")
    out = tmp_path / "subprocess"
    out.mkdir()
    # Same thread count (LAPACK's bits depend on it), another hash seed (set order must not leak).
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, "-m", "lorasurgeon", *w.argv(valid, out / w.out_name)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert snapshot(out) == ref
