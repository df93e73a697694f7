"""Every file-reading argument of every command, fed every hostile input that fits it.

Each case must fail cleanly (GUIDE §2): exit 1, exactly one short line on stderr that names the
file and the problem, no traceback, nothing on stdout, nothing written to the output folder (no
output, no ``.tmp-`` file), the hostile input itself unchanged, and no code run from a pickle.
The commands run in-process through Typer's CliRunner; tests/robustness/test_memory.py runs the
lying-header cases again as real processes to bound their memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.robustness.hostile import (
    Case,
    Slot,
    Valid,
    adapter_cases,
    check_clean_failure,
    data_cases,
    factorized_metadata_cases,
    folder_cases,
    header_cases,
    invoke,
    marker_path,
    matrix,
    nonfinite_cases,
    pickle_cases,
    random_cases,
    tree_digest,
    truncated_cases,
    wrong_model_cases,
)

FAST_CASES: list[Case] = [
    *header_cases(),
    *truncated_cases(12),
    *random_cases([0]),
    *pickle_cases(),
    *folder_cases(),
    *adapter_cases(),
    *wrong_model_cases(),
    *nonfinite_cases(),
    *factorized_metadata_cases(),
    *data_cases(),
]
FAST = matrix(FAST_CASES)

# The slow sweep: a cut at every byte of a small file and more random files, through the
# commands that reach the reader by different paths (checkpoint, adapter, factorized, data).
SLOW_SLOTS = ("inspect", "factorize", "merge-adapter", "densify", "extract-tuned", "attach-data")
SLOW_CASES: list[Case] = [*truncated_cases(None), *random_cases(range(1, 9), lengths=(2, 9, 100, 1000, 20000))]
SLOW = [(s, c) for s, c in matrix(SLOW_CASES) if s.id in SLOW_SLOTS]


def run_case(slot: Slot, case: Case, valid: Valid, dirs: tuple[Path, Path]) -> str:
    in_dir, out_dir = dirs
    hostile, culprits = case.build(in_dir, valid)
    before = tree_digest(in_dir)
    out = invoke(slot.argv(hostile, valid, out_dir))
    assert not marker_path(in_dir).exists(), "a pickle ran code while loading"
    line = check_clean_failure(out, culprits, case.problem, out_dir)
    assert tree_digest(in_dir) == before, "the input was modified"
    return line


@pytest.mark.parametrize(("slot", "case"), FAST, ids=[f"{s.id}:{c.id}" for s, c in FAST])
def test_hostile_input(slot: Slot, case: Case, valid: Valid, dirs: tuple[Path, Path]) -> None:
    run_case(slot, case, valid, dirs)


@pytest.mark.slow
@pytest.mark.parametrize(("slot", "case"), SLOW, ids=[f"{s.id}:{c.id}" for s, c in SLOW])
def test_hostile_input_sweep(slot: Slot, case: Case, valid: Valid, dirs: tuple[Path, Path]) -> None:
    run_case(slot, case, valid, dirs)


def test_every_slot_gets_cases() -> None:
    """Guard against a refactor that silently drops a command from the matrix."""
    from tests.robustness.hostile import SLOTS

    counts = {s.id: 0 for s in SLOTS}
    for s, _ in FAST:
        counts[s.id] += 1
    assert all(n >= 5 for k, n in counts.items() if k != "inspect-spectrum"), counts
    assert counts["inspect-spectrum"] >= 3
