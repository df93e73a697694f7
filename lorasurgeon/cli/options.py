"""Shared Annotated option types, so every command spells its options alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


class OutputPath(type(Path())):  # type: ignore[misc]
    """A path that keeps the text it was given (``given``): pathlib drops a trailing "/", which
    says the user meant a folder (``io.writer.check_output`` refuses it for a one-file output)."""

    given: str


def output_path(text: str) -> Path:
    """``-o``'s parser: the path, remembering its text."""
    p = OutputPath(text)
    p.given = text
    return p


KohyaLegacyOpt = Annotated[
    bool,
    typer.Option("--kohya-legacy", help="--sv-* as sd-scripts before its PR #2194: one value more than the criterion needs."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout, nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", "-i", metavar="<glob>", help="Glob over tensor or module names to keep (repeatable). Each must match something."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", "-x", metavar="<glob>", help="Glob over tensor or module names to drop (repeatable). Each must match something."),
]
InputPath = Annotated[
    Path,
    # readable=False: an unreadable input is our one-line error (exit 1, JSON with --json), not a parser error
    typer.Argument(readable=False, help="A .safetensors file, sharded folder or index, .pt/.bin/.pth state dict, model folder or adapter."),
]
ComponentOpt = Annotated[
    str | None,
    typer.Option("--component", help="kohya/diffusers output: the pipeline part (unet, text_encoder, text_encoder_2, "
                 "transformer) of the layers whose names say none."),
]
