"""``lorasurgeon resize`` and ``lorasurgeon extract``: parse, call one library function, render."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorasurgeon.cli.options import (
    ComponentOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    KohyaLegacyOpt,
    QuietOpt,
    output_path,
)
from lorasurgeon.cli.output import handle_errors, human_count, log, print_json, progress, stdout_console
from lorasurgeon.errors import InvalidOptionError
from lorasurgeon.factorize import make_rule
from lorasurgeon.io.writer import require_output
from lorasurgeon.resize import (
    ExtractLayer,
    ExtractResult,
    ResizeLayer,
    ResizeResult,
    extract_adapter,
    resize_adapter,
)

P = "Rank rule (exactly one)"
RankOpt = Annotated[int | None, typer.Option("--rank", help="Fixed rank.", rich_help_panel=P)]
RatioOpt = Annotated[float | None, typer.Option("--ratio", help="resize: fraction of the current rank; extract: of min(m,n).", rich_help_panel=P)]
EnergyOpt = Annotated[float | None, typer.Option("--energy", help="Smallest rank keeping this share of the squared Frobenius energy.", rich_help_panel=P)]
SvRatioOpt = Annotated[float | None, typer.Option("--sv-ratio", help="kohya: keep the values > σ_max/T.", rich_help_panel=P)]
SvFroOpt = Annotated[float | None, typer.Option("--sv-fro", help="kohya: the fewest values holding T² of the energy (Frobenius share T).", rich_help_panel=P)]
SvCumOpt = Annotated[float | None, typer.Option("--sv-cumulative", help="kohya: the fewest values holding T of Σσ.", rich_help_panel=P)]
MaxRankOpt = Annotated[int | None, typer.Option("--max-rank", help="Cap the rank (kohya's --new_rank).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
Fp64Opt = Annotated[bool, typer.Option("--fp64", help="Compute in fp64.")]


def register(app: typer.Typer) -> None:
    app.command("resize")(resize_command)
    app.command("extract")(extract_command)


def _rule(rank, ratio, energy, sv_ratio, sv_fro, sv_cumulative, max_rank, kohya_legacy):  # noqa: ANN001, ANN202
    rule, _ = make_rule(rank=rank, ratio=ratio, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro,
                        sv_cumulative=sv_cumulative, max_rank=max_rank, allow_budget=False, kohya_legacy=kohya_legacy)
    assert rule is not None
    return rule


def resize_command(
    adapter: Annotated[Path, typer.Argument(readable=False, help="A PEFT folder or file, kohya/LyCORIS LoCon file, or diffusers LoRA file.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output adapter (folder for PEFT, file otherwise).")] = None,
    rank: RankOpt = None, ratio: RatioOpt = None, energy: EnergyOpt = None, sv_ratio: SvRatioOpt = None,
    sv_fro: SvFroOpt = None, sv_cumulative: SvCumOpt = None, max_rank: MaxRankOpt = None, kohya_legacy: KohyaLegacyOpt = False,
    fmt: Annotated[str | None, typer.Option("--format", help="peft | kohya | diffusers (default: the input's).")] = None,
    component: ComponentOpt = None,
    fp64: Fp64Opt = False, dry_run: DryRunOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Re-rank a LoRA exactly: SVD of B·A from the factors, alpha rewritten to keep the scale."""
    with handle_errors(json_out):
        rule = _rule(rank, ratio, energy, sv_ratio, sv_fro, sv_cumulative, max_rank, kohya_legacy)
        require_output(output, dry_run)
        with progress("resize", quiet) as cb:
            r = resize_adapter(adapter, output, rule, fmt=fmt, fp64=fp64, force=force, dry_run=dry_run, progress=cb,
                               component=component)
        for w in r.warnings:
            log(f"warning: {w}", quiet)
        if not dry_run:
            log(f"wrote {output}", quiet)
        print_json(r.to_json()) if json_out else render_resize(r)


def extract_command(
    base: Annotated[Path, typer.Option("--base", readable=False, help="The base checkpoint or model folder.")],
    tuned: Annotated[Path, typer.Option("--tuned", readable=False, help="The fine-tuned checkpoint or model folder.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output adapter (folder for PEFT).")] = None,
    rank: RankOpt = None, ratio: RatioOpt = None, energy: EnergyOpt = None, sv_ratio: SvRatioOpt = None,
    sv_fro: SvFroOpt = None, sv_cumulative: SvCumOpt = None, max_rank: MaxRankOpt = None, kohya_legacy: KohyaLegacyOpt = False,
    fmt: Annotated[str, typer.Option("--format", help="peft | kohya | diffusers.")] = "peft",
    include: IncludeOpt = None, exclude: ExcludeOpt = None,
    save_other: Annotated[bool, typer.Option("--save-other", help="Save changed non-LoRA tensors (biases, norms, heads) as modules_to_save.")] = False,
    component: ComponentOpt = None,
    svd_method: Annotated[str, typer.Option("--svd", help="exact | randomized | auto.")] = "auto",
    fp64: Fp64Opt = False, seed: Annotated[int, typer.Option("--seed")] = 0,
    dry_run: DryRunOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Extract a LoRA from a fine-tune: truncated SVD of (tuned − base) per weight."""
    with handle_errors(json_out):
        if svd_method not in ("auto", "exact", "randomized"):
            raise InvalidOptionError(f"--svd must be auto, exact or randomized, got {svd_method!r}")
        rule = _rule(rank, ratio, energy, sv_ratio, sv_fro, sv_cumulative, max_rank, kohya_legacy)
        require_output(output, dry_run)
        with progress("extract", quiet) as cb:
            r = extract_adapter(base, tuned, output, rule, fmt=fmt, include=include, exclude=exclude, save_other=save_other,
                                svd_method=svd_method, fp64=fp64, seed=seed, force=force, dry_run=dry_run, progress=cb,
                                component=component)
        for w in r.warnings:
            log(f"warning: {w}", quiet)
        if not dry_run:
            log(f"wrote {output}", quiet)
        print_json(r.to_json()) if json_out else render_extract(r)


def _print_cast(con: Console, layers: Sequence[ResizeLayer | ExtractLayer], whose: str) -> None:
    cast = max((x.cast_error for x in layers), default=0.0)
    if cast:
        con.print(f"storing the factors in {whose} dtype changed them by up to {cast:.3g} (relative)")


def render_resize(r: ResizeResult) -> None:
    con = stdout_console()
    t = Table(title="Resized targets", title_justify="left")
    for c in ("module", "shape", "rank", "alpha", "scale", "Frobenius kept"):
        t.add_column(c, justify="left" if c in ("module", "shape") else "right")
    for x in r.layers:
        t.add_row(x.module, "×".join(map(str, x.shape)), f"{x.rank_before} -> {x.rank_after}",
                  f"{x.alpha_before:g} -> {x.alpha_after:g}", f"{x.scale:.4g}", f"{x.fro_kept:.4f}")
    con.print(t)
    con.print(f"parameters: {human_count(r.params_before)} -> {human_count(r.params_after)}")
    _print_cast(con, r.layers, "the input's")


def render_extract(r: ExtractResult) -> None:
    con = stdout_console()
    t = Table(title="Extracted targets", title_justify="left")
    for c in ("module", "shape", "rank", "‖ΔW‖_F", "rel. error"):
        t.add_column(c, justify="left" if c in ("module", "shape") else "right")
    for x in r.layers:
        t.add_row(x.module, "×".join(map(str, x.shape)), str(x.rank), f"{x.delta_norm:.4g}", f"{x.rel_error:.4f}")
    con.print(t)
    con.print(f"unchanged tensors: {len(r.unchanged)}; other changed tensors: {len(r.other_changed)}"
              + (f" (saved: {len(r.saved_other)})" if r.saved_other else " (pass --save-other to keep them)" if r.other_changed else ""))
    con.print(f"adapter parameters: {human_count(r.adapter_params)}")
    _print_cast(con, r.layers, "the weights'")
