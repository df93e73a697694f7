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
    SLOTS,
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

# Byte-level corruptions, pickles and broken folders all meet the same reader (Checkpoint.open):
# the fast suite sends them through one command per distinct route to it, the slow suite
# through every command.
FILE_LEVEL: list[Case] = [*header_cases(), *truncated_cases(10), *random_cases([0]), *pickle_cases(), *folder_cases()]
ROUTES = ("inspect", "factorize", "densify", "merge-adapter", "attach-data", "distill-student")
# Everything else is about what a command does with a readable file: every command it fits.
OTHER: list[Case] = [
    *adapter_cases(),
    *wrong_model_cases(),
    *nonfinite_cases(),
    *factorized_metadata_cases(),
    *data_cases(),
]
# ...and a sample of them through every command, so each argument meets a lie, a pickle and an
# escaping index in the fast suite too.
SAMPLE = {"empty", "hlen-1e12", "offsets-past-end", "key-lone-surrogate", "pickle-os-system-zip",
          "pickle-peft-adapter_model.bin", "pickle-evil-data.pkl-in-zip", "index-outside-folder", "index-symlink-escapes"}
FAST = [(s, c) for s, c in matrix(FILE_LEVEL) if s.id in ROUTES or c.id in SAMPLE] + matrix(OTHER)

# The slow sweep: the reader-level cases through the other commands; a cut at every byte of a
# small file's length field and header (and 40 points in its data); more random files.
SWEEP: list[Case] = [*truncated_cases(None, data_points=40), *random_cases(range(1, 9), lengths=(2, 9, 100, 1000, 20000))]
SLOW = [(s, c) for s, c in matrix(FILE_LEVEL) if s.id not in ROUTES and c.id not in SAMPLE] + [
    (s, c) for s, c in matrix(SWEEP) if s.id in ("inspect", "merge-adapter", "densify", "attach-data")]


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
    """Guard against a refactor that silently drops a command from the matrix (fast and slow)."""
    fast = {s.id: 0 for s in SLOTS}
    every = {s.id: 0 for s in SLOTS}
    for s, _ in FAST:
        fast[s.id] += 1
        every[s.id] += 1
    for s, _ in SLOW:
        every[s.id] += 1
    assert all(n >= 3 for n in fast.values()), fast
    assert all(n >= 20 for k, n in every.items() if k != "inspect-spectrum"), every
