"""``lorasurgeon inspect``: parse options, call ``inspect_checkpoint``, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorasurgeon.cli.options import (
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    InputPath,
    JsonOpt,
    QuietOpt,
    output_path,
)
from lorasurgeon.cli.output import (
    handle_errors,
    human_bytes,
    human_count,
    log,
    print_json,
    progress,
    stdout_console,
)
from lorasurgeon.inspection import InspectResult, inspect_checkpoint, plot_spectra


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


def inspect_command(
    path: InputPath,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    spectrum: Annotated[
        bool, typer.Option("--spectrum", help="Singular-value statistics of every 2-D and conv weight (of an adapter: of each "
                                 "target's update s·B·A, from the factors).")
    ] = False,
    rank: Annotated[
        int | None, typer.Option("--rank", help="With --spectrum: report the energy kept at this rank.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", readable=False, parser=output_path, metavar="<path>", help="Draw the normalised spectra to this PNG (implies --spectrum).")
    ] = None,
    tensors: Annotated[
        bool | None,
        typer.Option("--tensors/--no-tensors", help="Show the per-tensor table (default: on, off with --spectrum)."),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Show what is in a checkpoint or adapter: tensors, kinds, ranks, alpha, spectra."""
    with handle_errors(json_out):
        want_spectrum = spectrum or plot is not None
        with progress("spectrum", quiet) as cb:
            result = inspect_checkpoint(
                path,
                include=include,
                exclude=exclude,
                spectrum=want_spectrum,
                rank=rank,
                keep_singular_values=plot is not None,
                progress=cb,
            )
        if plot is not None:
            plot_spectra(result, plot, force=force)
            log(f"wrote {plot}", quiet)
        if json_out:
            print_json(result.to_json())
        else:
            render(result, show_tensors=(not want_spectrum) if tensors is None else tensors)


def render(r: InspectResult, show_tensors: bool) -> None:
    con = stdout_console()
    con.print(f"[bold]{r.path}[/]: {r.kind_description}")
    if r.unsupported:
        con.print(f"not usable by merge, convert, compose or resize: {r.unsupported}", markup=False)
    if r.weights_file:
        con.print(f"weights: {r.weights_file}" + (f" ({len(r.files)} files)" if len(r.files) > 1 else ""))
    if r.config:
        con.print("config: " + ", ".join(f"{k}={v}" for k, v in r.config.items()))
    con.print(
        f"tensors: {r.totals.tensors}   parameters: {human_count(r.totals.params)} ({r.totals.params:,})   "
        f"size: {human_bytes(r.totals.bytes)}"
    )
    if show_tensors:
        t = Table(title="Tensors", title_justify="left")
        for c, j in (("name", "left"), ("shape", "left"), ("dtype", "left"), ("params", "right"), ("bytes", "right")):
            t.add_column(c, justify=j)
        for row in r.tensors:
            t.add_row(row.name, "×".join(map(str, row.shape)) or "scalar", row.dtype, f"{row.params:,}", human_bytes(row.bytes))
        con.print(t)
    for title, groups in (("By dtype", r.by_dtype), ("By module group", r.by_group)):
        t = Table(title=title, title_justify="left")
        for c, j in ((title.split()[-1], "left"), ("tensors", "right"), ("params", "right"), ("bytes", "right")):
            t.add_column(c, justify=j)
        for k, v in groups.items():
            t.add_row(k, str(v.tensors), f"{v.params:,}", human_bytes(v.bytes))
        con.print(t)
    if r.adapter:
        a = r.adapter
        con.print(
            f"adapter: {a.format}, {a.targets} targets, ranks {a.ranks}, alphas {a.alphas}"
            + (", rslora" if a.use_rslora else "")
            + (f", init_lora_weights {a.base_changing_init} (changes the base weights)" if a.base_changing_init else "")
            + (f", modules_to_save: {len(a.modules_to_save)} tensors" if a.modules_to_save else "")
        )
        t = Table(title="Adapter targets", title_justify="left")
        for c, j in (("module", "left"), ("out×in", "left"), ("rank", "right"), ("alpha", "right"),
                     ("scale", "right"), ("‖ΔW‖_F", "right"), ("extra", "left")):
            t.add_column(c, justify=j)
        for row in a.rows:
            shape = f"{row.out_features}×{row.in_features}" + (f"×{'×'.join(map(str, row.kernel))}" if row.kernel else "")
            extra = ",".join(x for x, on in (("dora", row.dora), ("bias", row.bias)) if on)
            t.add_row(row.module, shape, str(row.rank), f"{row.alpha:g}", f"{row.scale:.4g}", f"{row.delta_norm:.4g}", extra)
        con.print(t)
    if r.factorized_layers:
        con.print(f"factorized layers: {len(r.factorized_layers)}")
    if r.spectrum:
        what = "of each target's update s·B·A " if r.adapter else ""
        t = Table(title=f"Spectrum {what}(energy = share of squared Frobenius norm)", title_justify="left")
        first = "module" if r.adapter else "weight"
        cols = [first, "shape", "full", "eff. rank", "r@90%", "r@95%", "r@99%", "break-even", "σ_max"]
        if r.spectrum_rank:
            cols.append(f"energy@{r.spectrum_rank}")
        for c in cols:
            t.add_column(c, justify="left" if c in (first, "shape") else "right")
        for s in r.spectrum:
            cells = [s.name, "×".join(map(str, s.shape)), str(s.full_rank), f"{s.effective_rank:.1f}",
                     str(s.rank_90), str(s.rank_95), str(s.rank_99), f"{s.break_even:.1f}", f"{s.sigma_max:.4g}"]
            if r.spectrum_rank:
                cells.append(f"{s.energy_at_rank:.4f}")
            t.add_row(*cells)
        con.print(t)
