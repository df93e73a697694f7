"""``lorasurgeon merge``: parse options, call ``merge_adapters``, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorasurgeon.cli.options import ForceOpt, JsonOpt, QuietOpt, output_path
from lorasurgeon.cli.output import handle_errors, log, print_json, progress, stdout_console
from lorasurgeon.merge import MergeResult, merge_adapters


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)


def merge_command(
    base: Annotated[Path, typer.Argument(readable=False, help="Base checkpoint or model folder.")],
    adapters: Annotated[list[Path], typer.Argument(readable=False, help="One or more LoRA adapters (PEFT, kohya/LoCon, diffusers).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output .safetensors (a folder for a model folder base).")] = None,
    weight: Annotated[list[float] | None, typer.Option("--weight", "-w", help="One per adapter, in order (default 1).")] = None,
    unmerge: Annotated[bool, typer.Option("--unmerge", help="Subtract plain LoRA instead of adding it.")] = False,
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="Skip targets that match no base weight, with a warning.")] = False,
    component: Annotated[str | None, typer.Option("--component", help="Which part of a pipeline the base is (unet, text_encoder, text_encoder_2, transformer), for adapters with LoRA for several (default: the part whose targets fit).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print which weights would change; write nothing.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fold LoRA adapters into base weights: W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, exactly, streaming."""
    with handle_errors(json_out):
        with progress("merge", quiet) as cb:
            r = merge_adapters(base, adapters, output, weights=weight, unmerge=unmerge, allow_unmatched=allow_unmatched,
                               component=component, force=force, dry_run=dry_run, progress=cb, warn=lambda m: log(f"warning: {m}", quiet))
        if not dry_run:
            log(f"wrote {output}", quiet)
            if r.extra.get("config"):
                log(f"the adapters add a classification head: the output folder is a {r.extra['config']} "
                    "(config.json updated, encoder tensors renamed to its layout)", quiet)
        print_json(r.to_json()) if json_out else render(r)


def render(r: MergeResult) -> None:
    con = stdout_console()
    t = Table(title="Merge plan (dry run)" if r.dry_run else "Merged layers", title_justify="left")
    for c in ("module", "shape", "adapters", "‖ΔW‖_F", "‖ΔW‖/‖W‖"):
        t.add_column(c, justify="left" if c in ("module", "shape", "adapters") else "right")
    for x in r.layers:
        t.add_row(x.module, "×".join(map(str, x.shape)), ",".join(str(i + 1) for i in x.adapters),
                  "-" if r.dry_run else f"{x.update_norm:.4g}", "-" if r.dry_run else f"{x.relative_update:.4g}")
    con.print(t)
    if r.replaced or r.added:
        con.print(f"modules_to_save: replaced {len(r.replaced)} tensors, added {len(r.added)}")
