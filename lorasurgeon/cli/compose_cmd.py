"""``lorasurgeon compose``: parse, call ``compose_adapters``, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorasurgeon.cli.options import ComponentOpt, ForceOpt, JsonOpt, QuietOpt, output_path
from lorasurgeon.cli.output import handle_errors, human_count, log, print_json, progress, stdout_console
from lorasurgeon.compose import ComposeResult, compose_adapters
from lorasurgeon.io.writer import require_output
from lorasurgeon.ops.compose import COMPOSE_METHODS, method_names

_METHODS_HELP = "; ".join(f"{m.name}: {m.summary}" for m in COMPOSE_METHODS.values())


def register(app: typer.Typer) -> None:
    app.command("compose")(compose_command)


def compose_command(
    adapters: Annotated[list[Path], typer.Argument(readable=False, help="Adapters to compose (PEFT folder or file, kohya, diffusers), in --weight order.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output adapter (a folder for PEFT, a file otherwise).")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help=f"One of {', '.join(method_names())}. {_METHODS_HELP}.")] = "cat",
    weight: Annotated[list[float] | None, typer.Option("--weight", "-w", help="One weight per adapter, in order (default 1 each). Repeat the option.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Output rank of svd, ties, dare_*, magnitude_prune (default: the largest input rank per layer).")] = None,
    density: Annotated[float | None, typer.Option("--density", help="Fraction of each delta's entries kept by ties, dare_*, magnitude_prune (0 < D <= 1).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of DARE's random masks (per layer: seed and module name); default 0.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Output layout: peft | kohya | diffusers (default: the inputs' layout when they share one, else peft).")] = None,
    component: ComponentOpt = None,
    fp64: Annotated[bool, typer.Option("--fp64", help="Compute in fp64.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and print the plan (ranks, errors); write nothing.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Combine LoRA adapters into one: exact concatenation (cat, the default), exact sum recompressed
    by SVD (svd), TIES / DARE / magnitude pruning on the deltas, or PEFT's factor-wise 'linear'."""
    with handle_errors(json_out):
        require_output(output, dry_run)
        with progress("compose", quiet) as cb:
            r = compose_adapters(adapters, output, method, weights=weight, rank=rank, density=density, seed=seed,
                                 fmt=fmt, fp64=fp64, force=force, dry_run=dry_run, progress=cb,
                                 component=component)
        for w in r.warnings:
            log(f"warning: {w}", quiet)
        if not dry_run:
            log(f"wrote {output}", quiet)
        print_json(r.to_json()) if json_out else render_compose(r)


def render_compose(r: ComposeResult) -> None:
    con = stdout_console()
    title = f"Composed targets ({r.method}{', exact' if r.exact else ''}{', dry run' if r.dry_run else ''})"
    t = Table(title=title, title_justify="left")
    for c in ("module", "shape", "rank", "inputs", "rel. error"):
        t.add_column(c, justify="left" if c in ("module", "shape") else "right")
    for x in r.layers:
        t.add_row(x.module, "×".join(map(str, x.shape)), str(x.rank), str(x.sources), f"{x.rel_error:.3g}")
    con.print(t)
    tot = r.totals
    con.print(f"weights: {', '.join(f'{w:g}' for w in r.weights)}; layers: {tot['layers']}; ranks {tot['rank_min']}"
              f"..{tot['rank_max']}; parameters: {human_count(tot['input_params'])} in -> {human_count(tot['params'])} out; "
              f"largest rel. error {tot['max_rel_error']:.3g}"
              + (f"; storing the factors in the inputs' dtype changed them by up to {tot['max_cast_error']:.3g} (relative)"
                 if tot.get("max_cast_error") else ""))
    if r.modules_to_save:
        con.print(f"modules_to_save: {len(r.modules_to_save)} tensor(s)" + (f", {len(r.averaged)} averaged" if r.averaged else ""))
