"""``lorasurgeon convert``: parse options, call ``convert_adapter``, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorasurgeon.cli.options import ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, QuietOpt, output_path
from lorasurgeon.cli.output import handle_errors, log, print_json, stdout_console
from lorasurgeon.convert import convert_adapter


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)


def convert_command(
    adapter: Annotated[Path, typer.Argument(readable=False, help="A PEFT folder or file, kohya/LoCon file, or diffusers LoRA file.")],
    to: Annotated[str, typer.Option("--to", help="peft | kohya | diffusers.")],
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output (a folder for peft, a .safetensors file otherwise).")],
    base: Annotated[Path | None, typer.Option("--base", readable=False, help="Base checkpoint: maps kohya's lossy names back to modules (kohya files lorasurgeon wrote record them).")] = None,
    component: Annotated[str | None, typer.Option("--component", help="The pipeline part (unet, text_encoder, text_encoder_2, transformer): keep only its LoRA, or name the part of targets whose names do not say.")] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="With --base: rewrite targets of a PiSSA or OLoRA adapter (PEFT init_lora_weights, which changes the base) as plain LoRA of twice the rank for that base.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert an adapter between PEFT, kohya and diffusers layouts; every delta is checked first."""
    with handle_errors(json_out):
        r = convert_adapter(adapter, to, output, base=base, component=component, include=include, exclude=exclude, plain=plain, force=force)
        for w in r.warnings:
            log(f"warning: {w}", quiet)
        for c, n in r.skipped_components.items():
            log(f"skipped the {n} {c} target(s) (--component {component})", quiet)
        log(f"wrote {output}", quiet)
        if json_out:
            print_json(r.to_json())
        else:
            stdout_console().print(
                f"converted {r.targets} targets {r.from_format} -> {r.to_format}; "
                f"largest delta difference {r.max_abs_delta_diff:.3g}"
            )
