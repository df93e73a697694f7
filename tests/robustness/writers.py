"""Every command that writes a file, as ``argv(valid, output)``, for the fault, force, repeatability
and concurrency tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.robustness.hostile import ARCH, Valid, _s

TRAIN = ["--epochs", "1", "--batch-size", "64", "--quiet"]


@dataclass(frozen=True)
class Writer:
    id: str
    out_name: str  # a file name, or a folder name (PEFT adapters, attach)
    argv: Callable[[Valid, Path], list[str]]
    trains: bool = False  # trains a model (seconds a run): faulted only in the slow suite
    variant: bool = False  # another option set of a command already covered: slow suite only
    fast_faults: bool = True  # False: seconds a run (calibration, matplotlib): faulted in the slow suite only


WRITERS: list[Writer] = [
    Writer("factorize", "f.safetensors", lambda v, o: _s("factorize", v.base, "-o", o, "--rank", "3", "--svd", "randomized",
                                                          "--seed", "3", "--quiet")),
    Writer("factorize-energy", "f.safetensors", lambda v, o: _s("factorize", v.base, "-o", o, "--energy", "0.8",
                                                                 "--svd", "exact", "--quiet"), variant=True),
    Writer("factorize-budget", "f.safetensors", lambda v, o: _s("factorize", v.base, "-o", o, "--budget", "0.3",
                                                                 "--quiet"), variant=True),
    Writer("factorize-svd-llm", "f.safetensors", lambda v, o: _s("factorize", v.base, "--arch", ARCH, "--calibration",
                                                                  v.data, "--method", "svd-llm", "--rank", "8", "-o", o,
                                                                  "--quiet"), fast_faults=False),
    Writer("factorize-asvd", "f.safetensors", lambda v, o: _s("factorize", v.base, "--arch", ARCH, "--calibration", v.data,
                                                               "--method", "asvd", "--energy", "0.9", "-o", o, "--quiet"),
           variant=True),
    Writer("factorize-fwsvd", "f.safetensors", lambda v, o: _s("factorize", v.base, "--arch", ARCH, "--calibration", v.data,
                                                                "--method", "fwsvd", "--rank", "8", "-o", o, "--quiet"),
           variant=True),
    Writer("densify", "d.safetensors", lambda v, o: _s("factorize", "--densify", v.fact, "-o", o, "--quiet")),
    Writer("merge", "m.safetensors", lambda v, o: _s("merge", v.base, v.peft, v.peft2, "-w", "0.5", "-w", "2", "-o", o,
                                                      "--quiet")),
    Writer("merge-kohya", "m.safetensors", lambda v, o: _s("merge", v.base, v.kohya, "-o", o, "--quiet"), variant=True),
    Writer("compose-cat", "c", lambda v, o: _s("compose", v.peft, v.peft2, "-w", "1", "-w", "0.25", "-o", o, "--quiet")),
    Writer("compose-svd", "c.safetensors", lambda v, o: _s("compose", v.peft, v.peft2, "--method", "svd", "--rank", "3",
                                                            "--format", "kohya", "-o", o, "--quiet"), variant=True),
    Writer("compose-dare-ties", "c", lambda v, o: _s("compose", v.peft, v.peft2, "--method", "dare_ties", "--density",
                                                      "0.5", "--seed", "7", "-o", o, "--quiet"), variant=True),
    Writer("convert-kohya", "k.safetensors", lambda v, o: _s("convert", v.peft, "--to", "kohya", "-o", o, "--quiet")),
    Writer("convert-diffusers", "d.safetensors", lambda v, o: _s("convert", v.peft, "--to", "diffusers", "-o", o,
                                                                  "--quiet"), variant=True),
    Writer("convert-peft", "p", lambda v, o: _s("convert", v.kohya, "--to", "peft", "--base", v.base, "-o", o, "--quiet"), variant=True),
    Writer("extract", "e", lambda v, o: _s("extract", "--base", v.base, "--tuned", v.tuned, "-o", o, "--rank", "2",
                                            "--svd", "randomized", "--seed", "1", "--quiet")),
    Writer("extract-kohya", "e.safetensors", lambda v, o: _s("extract", "--base", v.base, "--tuned", v.tuned, "-o", o,
                                                              "--energy", "0.99", "--format", "kohya", "--quiet"), variant=True),
    Writer("resize", "r", lambda v, o: _s("resize", v.peft, "-o", o, "--rank", "1", "--quiet")),
    Writer("resize-kohya", "r.safetensors", lambda v, o: _s("resize", v.kohya, "-o", o, "--sv-fro", "0.9", "--quiet"), variant=True),
    Writer("inspect-plot", "s.png", lambda v, o: _s("inspect", v.base, "--spectrum", "--plot", o, "--quiet"),
           fast_faults=False),
    Writer("export", "e.onnx", lambda v, o: _s("export", v.base, "--arch", ARCH, "--input-shape", "1,8,8", "-o", o,
                                                "--quiet"), variant=True),
    Writer("export-factorized", "e.onnx", lambda v, o: _s("export", v.fact, "--arch", ARCH, "-o", o, "--quiet"), variant=True),
    Writer("export-merged-adapter", "e.onnx", lambda v, o: _s("export", v.base, "--arch", ARCH, "-a", v.peft, "-o", o,
                                                               "--quiet"), variant=True),
    Writer("export-separate-adapters", "e.onnx", lambda v, o: _s("export", v.base, "--arch", ARCH, "-a", v.peft, "-a",
                                                                  v.peft2, "--separate-adapters", "-o", o, "--quiet")),
    Writer("attach", "a", lambda v, o: _s("attach", v.base, "--arch", ARCH, "--data", v.data, "-o", o, "--target", "fc*",
                                           "--rank", "2", "--head", "classifier", *TRAIN), trains=True),
    Writer("attach-full", "a.safetensors", lambda v, o: _s("attach", v.base, "--arch", ARCH, "--data", v.data, "-o", o,
                                                            "--full", *TRAIN), trains=True, variant=True),
    Writer("distill", "s.safetensors", lambda v, o: _s("distill", "--teacher", v.base, "--student", v.fact, "--arch", ARCH,
                                                        "--data", v.data, "-o", o, *TRAIN), trains=True),
]
WRITER_BY_ID = {w.id: w for w in WRITERS}


def params(writers: list[Writer], slow_if: Callable[[Writer], bool]) -> list:
    """pytest params with ids; those for which ``slow_if`` holds are marked slow."""
    import pytest

    return [pytest.param(w, id=w.id, marks=[pytest.mark.slow] if slow_if(w) else []) for w in writers]


def copy_valid(v: Valid, dest: Path) -> Valid:
    """The same inputs in another folder (same basenames), for "wherever the files lie"."""
    shutil.copytree(v.root, dest)
    return Valid(dest, *(dest / p.relative_to(v.root) for p in (v.base, v.tuned, v.peft, v.peft2, v.kohya, v.fact, v.data)))


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (an output folder, or one file), by relative path."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
