"""File names that are not UTF-8 (legal on Linux: any bytes but '/' and NUL). Python hands them
to us as surrogate escapes; every command must read and write such files, print their names
escaped (never crash on a strict UTF-8 stdout), and name them in one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.robustness.hostile import (
    ARCH,
    Valid,
    _s,
    check_clean_failure,
    header_cases,
    invoke,
    listing,
    temp_leftovers,
)

BAD = os.fsdecode(b"m\xff\xfe-\xc3(")  # invalid UTF-8 bytes: \xff, \xfe and a truncated sequence


@pytest.fixture
def named(valid: Valid, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, PEFT adapter folder, output folder), the first two with non-UTF-8 names."""
    base = tmp_path / f"{BAD}.safetensors"
    shutil.copy(valid.base, base)
    ad = tmp_path / f"adapter{BAD}"
    shutil.copytree(valid.peft, ad)
    out = tmp_path / f"out{BAD}"
    out.mkdir()
    (tmp_path / "plain").mkdir()
    return base, ad, out


COMMANDS = {
    "inspect": lambda b, a, o, v: _s("inspect", b),
    "inspect-json": lambda b, a, o, v: _s("inspect", b, "--json"),
    "inspect-adapter": lambda b, a, o, v: _s("inspect", a),
    "factorize": lambda b, a, o, v: _s("factorize", b, "-o", o / f"f{BAD}.safetensors", "--rank", "2"),
    "merge": lambda b, a, o, v: _s("merge", b, a, "-o", o / f"m{BAD}.safetensors"),
    "resize": lambda b, a, o, v: _s("resize", a, "-o", o / f"r{BAD}", "--rank", "1"),
    "compose": lambda b, a, o, v: _s("compose", a, v.peft2, "-o", o / f"c{BAD}"),
    "convert": lambda b, a, o, v: _s("convert", a, "--to", "kohya", "-o", o / f"k{BAD}.safetensors"),
    "extract": lambda b, a, o, v: _s("extract", "--base", b, "--tuned", v.tuned, "-o", o / f"e{BAD}", "--rank", "2"),
    "attach": lambda b, a, o, v: _s("attach", b, "--arch", ARCH, "--data", v.data, "-o", o / f"a{BAD}", "--target",
                                    "fc*", "--epochs", "1", "--quiet"),
    "export-input": lambda b, a, o, v: _s("export", b, "--arch", ARCH, "-a", a, "-o", o.parent / "plain" / "e.onnx"),
    "export-output": lambda b, a, o, v: _s("export", b, "--arch", ARCH, "-o", o / f"e{BAD}.onnx"),
}
SLOW = {"attach", "export-input"}  # seconds a run: `make test-all`
XFAIL: dict[str, str] = {}


def _marks(k: str) -> list:
    return ([pytest.mark.xfail(reason=XFAIL[k], strict=True)] if k in XFAIL else []) + (
        [pytest.mark.slow] if k in SLOW else [])


@pytest.mark.parametrize("cmd", [pytest.param(k, marks=_marks(k)) for k in COMMANDS])
def test_non_utf8_file_names_work(cmd: str, named: tuple[Path, Path, Path], valid: Valid) -> None:
    base, ad, out = named
    res = invoke(COMMANDS[cmd](base, ad, out, valid))
    assert res.code == 0, res.stderr
    assert "Traceback" not in res.stderr
    if cmd.startswith("inspect"):
        assert "\\udcff" in res.stdout  # the name is printed, escaped
    else:
        where = out.parent / "plain" if cmd == "export-input" else out
        assert listing(where), "nothing written"
        assert temp_leftovers(where) == []


@pytest.mark.parametrize("case_id", ["hlen-1e12", "key-lone-surrogate", "offsets-past-end"])
def test_non_utf8_name_of_a_bad_file_in_the_error_line(case_id: str, valid: Valid, tmp_path: Path) -> None:
    case = next(c for c in header_cases() if c.id == case_id)
    d = tmp_path / f"in{BAD}"
    d.mkdir()
    built, _ = case.build(d, valid)
    hostile = built.rename(d / f"{BAD}.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    res = invoke(_s("factorize", hostile, "-o", out / "f.safetensors", "--rank", "2"))
    line = check_clean_failure(res, ["m\\udcff\\udcfe-\\udcc3("], case.problem, out)
    assert line.startswith("error: ")
