"""Every command that writes a file, as ``argv(valid, output)``, for the fault, force, repeatability
and concurrency tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.robustness.hostile import ARCH, Valid, _s

TRAIN = ["--epochs", "1", "--limit", "300", "--batch-size", "64", "--quiet"]


@dataclass(frozen=True)
class Writer:
    id: str
    out_name: str  # a file name, or a folder name (PEFT adapters, attach)
    argv: Callable[[Valid, Path], list[str]]
    slow: bool = False  # trains a model: kept out of the per-fault parametrizations of the fast suite


WRITERS: list[Writer] = [
    Writer("factorize", "f.safetensors", lambda v, o: _s("factorize", v.base, "-o", o, "--rank", "3", "--svd", "randomized",
                                                          "--seed", "3", "--quiet")),
    Writer("factorize-energy", "f.safetensors", lambda v, o: _s("factorize", v.base, "-o", o, "--energy", "0.8",
                                                                 "--svd", "exact", "--quiet")),
    Writer("factorize-budget", "f.safetensors", lambda v, o: _s("factorize", v.base, "-o", o, "--budget", "0.3",
                                                                 "--quiet")),
    Writer("densify", "d.safetensors", lambda v, o: _s("factorize", "--densify", v.fact, "-o", o, "--quiet")),
    Writer("merge", "m.safetensors", lambda v, o: _s("merge", v.base, v.peft, v.peft2, "-w", "0.5", "-w", "2", "-o", o,
                                                      "--quiet")),
    Writer("merge-kohya", "m.safetensors", lambda v, o: _s("merge", v.base, v.kohya, "-o", o, "--quiet")),
    Writer("compose-cat", "c", lambda v, o: _s("compose", v.peft, v.peft2, "-w", "1", "-w", "0.25", "-o", o, "--quiet")),
    Writer("compose-svd", "c.safetensors", lambda v, o: _s("compose", v.peft, v.peft2, "--method", "svd", "--rank", "3",
                                                            "--format", "kohya", "-o", o, "--quiet")),
    Writer("compose-dare-ties", "c", lambda v, o: _s("compose", v.peft, v.peft2, "--method", "dare_ties", "--density",
                                                      "0.5", "--seed", "7", "-o", o, "--quiet")),
    Writer("convert-kohya", "k.safetensors", lambda v, o: _s("convert", v.peft, "--to", "kohya", "-o", o, "--quiet")),
    Writer("convert-diffusers", "d.safetensors", lambda v, o: _s("convert", v.peft, "--to", "diffusers", "-o", o,
                                                                  "--quiet")),
    Writer("convert-peft", "p", lambda v, o: _s("convert", v.kohya, "--to", "peft", "--base", v.base, "-o", o, "--quiet")),
    Writer("extract", "e", lambda v, o: _s("extract", "--base", v.base, "--tuned", v.tuned, "-o", o, "--rank", "2",
                                            "--svd", "randomized", "--seed", "1", "--quiet")),
    Writer("extract-kohya", "e.safetensors", lambda v, o: _s("extract", "--base", v.base, "--tuned", v.tuned, "-o", o,
                                                              "--energy", "0.99", "--format", "kohya", "--quiet")),
    Writer("resize", "r", lambda v, o: _s("resize", v.peft, "-o", o, "--rank", "1", "--quiet")),
    Writer("resize-kohya", "r.safetensors", lambda v, o: _s("resize", v.kohya, "-o", o, "--sv-fro", "0.9", "--quiet")),
    Writer("inspect-plot", "s.png", lambda v, o: _s("inspect", v.base, "--spectrum", "--plot", o, "--quiet")),
    Writer("attach", "a", lambda v, o: _s("attach", v.base, "--arch", ARCH, "--data", "digits", "-o", o, "--target", "fc*",
                                           "--rank", "2", "--head", "classifier", *TRAIN), slow=True),
    Writer("attach-full", "a.safetensors", lambda v, o: _s("attach", v.base, "--arch", ARCH, "--data", "digits", "-o", o,
                                                            "--full", *TRAIN), slow=True),
    Writer("distill", "s.safetensors", lambda v, o: _s("distill", "--teacher", v.base, "--student", v.fact, "--arch", ARCH,
                                                        "--data", "digits", "-o", o, *TRAIN), slow=True),
]
WRITER_BY_ID = {w.id: w for w in WRITERS}


def copy_valid(v: Valid, dest: Path) -> Valid:
    """The same inputs in another folder (same basenames), for "wherever the files lie"."""
    shutil.copytree(v.root, dest)
    return Valid(dest, *(dest / p.relative_to(v.root) for p in (v.base, v.tuned, v.peft, v.peft2, v.kohya, v.fact)))


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of an output (a file or a folder), by relative path."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
