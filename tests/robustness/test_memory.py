"""Lying files must not make us allocate what they claim (a 1e12-byte header, 4 TiB storages,
offsets past the end, shapes whose product overflows): the commands run in a separate process,
whose peak resident memory is read with ``resource.getrusage(RUSAGE_CHILDREN)`` in a wrapper
process of its own (so no other test's children count). ``import torch`` alone is ~230 MB; the
bound is 600 MB, and each hostile case may add at most 150 MB over the process's first run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.robustness.hostile import (
    SLOT_BY_ID,
    Case,
    Outcome,
    Valid,
    _lying_zip_pickle,
    check_clean_failure,
    header_cases,
    marker_path,
    matrix,
    pickle_cases,
)

LIMIT_MB = 600
GROWTH_MB = 150
ROOT = Path(__file__).resolve().parents[2]

# A wrapper that runs its arguments as a child and prints the children's peak RSS (KiB on Linux).
WRAP = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stdout.write(p.stdout)\n"
    "sys.stderr.write(p.stderr)\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(p.returncode)\n"
)

# Runs many commands in one process through the real Click command; reports each run's outcome
# and the process's peak RSS after it.
DRIVER = """
import json, resource, sys
import click.testing, typer
from lorasurgeon.cli.app import app
cmd = typer.main.get_command(app)
runner = click.testing.CliRunner()
out = []
for item in json.load(open(sys.argv[1])):
    res = runner.invoke(cmd, item["argv"], prog_name="lorasurgeon")
    exc = res.exception
    out.append({"id": item["id"], "code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
                "escaped": None if exc is None or isinstance(exc, SystemExit) else repr(exc),
                "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
json.dump(out, open(sys.argv[2], "w"))
"""

LYING = {"hlen-1e12", "hlen-2^64-1", "hlen-99MB-short-file", "hlen-past-eof-by-1", "offsets-past-end", "offsets-1e12",
         "offsets-negative", "offsets-reversed", "overlapping", "shape-bytes-mismatch", "shape-overflow",
         "huge-dims-zero-bytes", "name-10k-chars"}
MEMORY_CASES: list[Case] = [c for c in header_cases() if c.id in LYING] + [
    c for c in pickle_cases() if "claims" in c.id] + [
    # Harmless: torch ignores a storage record's element count when it maps the file; either a
    # clean refusal or a correct read is fine, but never a 4 TiB allocation.
    Case("pickle-zip-storage-claims-4TiB", _lying_zip_pickle("storage", 2**40), frozenset({"ckpt", "adapter", "fact"}),
         "", may_succeed=True)]
ROUTES = ("inspect", "inspect-spectrum", "factorize", "densify", "merge-adapter", "extract-tuned", "attach-data",
          "distill-student")


def run_wrapped(argv: list[str], timeout: float = 300) -> tuple[int, str, str, float]:
    """Run ``argv`` as a grandchild under WRAP; returns (exit code, stdout, stderr, peak RSS in MB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("LORASURGEON_DEBUG", None)
    p = subprocess.run([sys.executable, "-c", WRAP, *argv], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=ROOT)
    err_lines = p.stderr.splitlines()
    assert err_lines and err_lines[-1].startswith("MAXRSS_KB "), p.stderr
    rss_mb = int(err_lines[-1].split()[1]) / 1024
    return p.returncode, p.stdout, "\n".join(err_lines[:-1]) + ("\n" if len(err_lines) > 1 else ""), rss_mb


def test_lying_files_stay_bounded_in_one_process(valid: Valid, tmp_path: Path) -> None:
    plan, expect = [], {}
    # First run: a valid command, the baseline the hostile runs are measured against.
    plan.append({"id": "baseline", "argv": ["inspect", str(valid.base), "--spectrum", "--json"]})
    pairs = [(s, c) for s, c in matrix(MEMORY_CASES) if s.id in ROUTES or (s.id == "inspect-spectrum" and "ckpt" in c.roles)]
    for k, (slot, case) in enumerate(pairs):
        in_dir, out_dir = tmp_path / f"{k}" / "in", tmp_path / f"{k}" / "out"
        in_dir.mkdir(parents=True)
        out_dir.mkdir()
        hostile, culprits = case.build(in_dir, valid)
        rid = f"{slot.id}:{case.id}"
        plan.append({"id": rid, "argv": slot.argv(hostile, valid, out_dir)})
        expect[rid] = (case, culprits, in_dir, out_dir)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, out, err, peak = run_wrapped([sys.executable, "-c", DRIVER, str(tmp_path / "plan.json"),
                                        str(tmp_path / "result.json")], timeout=600)
    assert code == 0, err[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())
    assert results[0]["code"] == 0, results[0]
    base_mb = results[0]["maxrss_kb"] / 1024
    assert peak < LIMIT_MB, f"peak RSS {peak:.0f} MB"
    growth = {r["id"]: r["maxrss_kb"] / 1024 - base_mb for r in results[1:]}
    worst = max(growth, key=growth.get)
    assert growth[worst] < GROWTH_MB, f"{worst} grew the process by {growth[worst]:.0f} MB (baseline {base_mb:.0f} MB)"
    for r in results[1:]:
        case, culprits, in_dir, out_dir = expect[r["id"]]
        assert r["escaped"] is None, r
        assert not marker_path(in_dir).exists()
        if case.may_succeed and r["code"] == 0:
            continue
        try:
            check_clean_failure(Outcome(r["code"], r["stdout"], r["stderr"]), culprits, case.problem, out_dir)
        except AssertionError as e:
            raise AssertionError(f"{r['id']}: {e}") from None
    print(f"{len(results) - 1} hostile runs; baseline {base_mb:.0f} MB, peak {peak:.0f} MB, worst growth "
          f"{growth[worst]:.1f} MB ({worst})")


def _real_cli_case(case_id: str, slot_id: str, valid: Valid, tmp_path: Path) -> float:
    case = next(c for c in MEMORY_CASES if c.id == case_id)
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    hostile, culprits = case.build(in_dir, valid)
    argv = SLOT_BY_ID[slot_id].argv(hostile, valid, out_dir)
    code, out, err, peak = run_wrapped([sys.executable, "-m", "lorasurgeon", *argv])
    check_clean_failure(Outcome(code, out, err), culprits, case.problem, out_dir)
    assert peak < LIMIT_MB, f"peak RSS {peak:.0f} MB"
    return peak


def test_the_measure_sees_an_allocation() -> None:
    """Control: the wrapper does report a child that really allocates and touches 700 MB."""
    code, _, _, peak = run_wrapped([sys.executable, "-c", "b = bytearray(700 * 2**20)"])
    assert code == 0 and peak > 700


@pytest.mark.slow
def test_real_process_1e12_header(valid: Valid, tmp_path: Path) -> None:
    """The console entry point itself (python -m lorasurgeon), not the in-process runner."""
    _real_cli_case("hlen-1e12", "factorize", valid, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", sorted(c.id for c in MEMORY_CASES if not c.may_succeed))
@pytest.mark.parametrize("slot_id", ["inspect", "merge-adapter"])
def test_real_process_each_lying_file(case_id: str, slot_id: str, valid: Valid, tmp_path: Path) -> None:
    _real_cli_case(case_id, slot_id, valid, tmp_path)
