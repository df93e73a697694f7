"""``lorasurgeon factorize``: parse options, call ``factorize_checkpoint`` (or ``densify``), render."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorasurgeon.calibrate import CalibrationOptions
from lorasurgeon.cli.options import (
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    InputPath,
    JsonOpt,
    KohyaLegacyOpt,
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
from lorasurgeon.errors import InvalidOptionError
from lorasurgeon.factorize import (
    DensifyResult,
    FactorizeResult,
    densify_checkpoint,
    factorize_checkpoint,
    make_rule,
)


def register(app: typer.Typer) -> None:
    app.command("factorize")(factorize_command)


def factorize_command(
    path: InputPath,
    output: Annotated[Path | None, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output .safetensors file (a folder for a model folder input).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Fixed rank k for every layer.", rich_help_panel="Rank rule (exactly one)")] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Rank = round(F·min(m,n)), at least 1.", rich_help_panel="Rank rule (exactly one)")] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="Smallest rank keeping this share of the squared Frobenius energy.", rich_help_panel="Rank rule (exactly one)")] = None,
    sv_ratio: Annotated[float | None, typer.Option("--sv-ratio", help="kohya: keep the values > σ_max/T.", rich_help_panel="Rank rule (exactly one)")] = None,
    sv_fro: Annotated[float | None, typer.Option("--sv-fro", help="kohya: the fewest values holding T² of the energy (Frobenius share T).", rich_help_panel="Rank rule (exactly one)")] = None,
    sv_cumulative: Annotated[float | None, typer.Option("--sv-cumulative", help="kohya: the fewest values holding T of Σσ.", rich_help_panel="Rank rule (exactly one)")] = None,
    budget: Annotated[float | None, typer.Option("--budget", help="Total parameters as a fraction of the selected layers', allocated to minimise the total squared error (optimal at the budgets the greedy hull search lands on, within one rank step otherwise).", rich_help_panel="Rank rule (exactly one)")] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Cap any per-layer rule (kohya's --new_rank).")] = None,
    kohya_legacy: KohyaLegacyOpt = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_params: Annotated[int, typer.Option("--min-params", help="Leave weights with fewer parameters dense.")] = 0,
    svd_method: Annotated[str, typer.Option("--svd", help="exact | randomized | auto (randomized when k <= min(m,n)/4).")] = "auto",
    fp64: Annotated[bool, typer.Option("--fp64", help="Compute SVDs in fp64.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")] = 0,
    calibration: Annotated[str | None, typer.Option("--calibration", help="Calibration data (any dataset attach reads): enables --method and the gate.", rich_help_panel="Calibration")] = None,
    method: Annotated[str, typer.Option("--method", help="svd | asvd | svd-llm | fwsvd (data-aware; needs --calibration).", rich_help_panel="Calibration")] = "svd",
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", help="Examples used for the statistics.", rich_help_panel="Calibration")] = 128,
    heldout_samples: Annotated[int, typer.Option("--heldout-samples", help="Other examples used to measure fidelity (the gate).", rich_help_panel="Calibration")] = 64,
    alpha: Annotated[float, typer.Option("--alpha", help="asvd: exponent on mean |activation|.", rich_help_panel="Calibration")] = 0.5,
    damping: Annotated[float, typer.Option("--damping", help="svd-llm: ridge on XᵀX relative to its mean diagonal.", rich_help_panel="Calibration")] = 1e-3,
    sequential: Annotated[bool, typer.Option("--sequential", help="svd-llm: fit each layer, in forward order, to the inputs of the model whose earlier layers are already factorized (one calibration pass per layer group).", rich_help_panel="Calibration")] = False,
    arch: Annotated[str | None, typer.Option("--arch", help="module:factory building the model when IN is a bare checkpoint (without --calibration: only to read conv groups, so grouped convs stay dense).", rich_help_panel="Calibration")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per calibration text.", rich_help_panel="Calibration")] = 128,
    image_size: Annotated[int | None, typer.Option("--image-size", rich_help_panel="Calibration")] = None,
    min_cosine: Annotated[float | None, typer.Option("--min-cosine", help="Gate: exit 3 and write nothing when the held-out mean cosine is lower.", rich_help_panel="Calibration")] = None,
    max_output_error: Annotated[float | None, typer.Option("--max-output-error", help="Gate: exit 3 when the held-out relative output error is higher.", rich_help_panel="Calibration")] = None,
    densify: Annotated[bool, typer.Option("--densify", help="Turn a factorized checkpoint back into dense weights (W = U·V).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (ranks, sizes); write nothing.")] = False,
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="A pattern matching nothing is a warning, not an error.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rewrite weight matrices W (m×n) as low-rank factors U·V by truncated SVD."""
    with handle_errors(json_out):
        if densify:
            if output is None:
                raise InvalidOptionError("--densify needs an output (-o)")
            # --densify multiplies every layer's factors back; nothing else applies to it
            given = {"--rank": rank, "--ratio": ratio, "--energy": energy, "--sv-ratio": sv_ratio, "--sv-fro": sv_fro,
                     "--sv-cumulative": sv_cumulative, "--budget": budget, "--max-rank": max_rank, "--include": include,
                     "--kohya-legacy": kohya_legacy,
                     "--exclude": exclude, "--calibration": calibration, "--arch": arch, "--min-cosine": min_cosine,
                     "--max-output-error": max_output_error, "--image-size": image_size}
            flags = [k for k, v in given.items() if v] + [k for k, on in (
                ("--min-params", min_params != 0), ("--svd", svd_method != "auto"), ("--fp64", fp64), ("--seed", seed != 0),
                ("--method", method != "svd"), ("--sequential", sequential), ("--dry-run", dry_run),
                ("--allow-unmatched", allow_unmatched)) if on]
            if flags:
                raise InvalidOptionError(f"--densify turns every factorized layer back into W = U·V and takes no "
                                         f"{', '.join(flags)}")
            with progress("densify", quiet) as cb:
                d = densify_checkpoint(path, output, force=force, progress=cb)
            print_json(d.to_json()) if json_out else render_densify(d)
            return
        cal = None
        if calibration is not None:
            cal = CalibrationOptions(calibration, method, calibration_samples, heldout_samples, alpha, damping, arch,
                                     max_length=max_length, image_size=image_size, min_cosine=min_cosine,
                                     max_output_error=max_output_error, seed=seed, sequential=sequential)
        elif method != "svd" or min_cosine is not None or max_output_error is not None or sequential:
            raise InvalidOptionError("--method, --sequential, --min-cosine and --max-output-error need --calibration DATA")
        rule, frac = make_rule(rank=rank, ratio=ratio, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro,
                               sv_cumulative=sv_cumulative, budget=budget, max_rank=max_rank,
                               kohya_legacy=kohya_legacy)
        with progress("factorize", quiet) as cb:
            result = factorize_checkpoint(
                path, output, rule=rule, budget=frac, include=include, exclude=exclude, min_params=min_params,
                svd_method=svd_method, fp64=fp64, seed=seed, force=force, dry_run=dry_run,
                allow_unmatched=allow_unmatched, progress=cb, calibration=cal, arch=None if cal else arch,
            )
        for w in result.warnings:
            log(f"warning: {w}", quiet)
        if not dry_run:
            log(f"wrote {output}", quiet)
        print_json(result.to_json()) if json_out else render(result)


def render(r: FactorizeResult) -> None:
    con = stdout_console()
    t = Table(title=("Plan (dry run)" if r.dry_run else "Factorized layers"), title_justify="left")
    for c in ("layer", "shape", "rank", "params before", "params after", "rel. error", "energy kept", "status"):
        t.add_column(c, justify="left" if c in ("layer", "shape", "status") else "right")
    for x in r.layers:
        t.add_row(
            x.module, "×".join(map(str, x.shape)), "-" if x.rank is None else str(x.rank),
            f"{x.params_before:,}", f"{x.params_after:,}",
            "-" if math.isnan(x.rel_error) else f"{x.rel_error:.4f}",
            "-" if math.isnan(x.energy_kept) else f"{x.energy_kept:.4f}", x.status,
        )
    con.print(t)
    for s in r.skipped:
        con.print(f"skipped {s['module']}: {s['reason']}")
    fid = r.extra.get("fidelity")
    if fid:
        con.print(f"held-out fidelity ({fid['heldout_samples']} examples): mean cosine {fid['mean_cosine']:.4f}, "
                  f"relative output error {fid['output_error']:.4f}")
    con.print(
        f"parameters: {human_count(r.params_before)} -> {human_count(r.params_after)}   "
        f"size: {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)}   compression: {r.compression:.2f}x"
    )


def render_densify(d: DensifyResult) -> None:
    stdout_console().print(
        f"densified {d.layers} layers: parameters {human_count(d.params_before)} -> {human_count(d.params_after)}"
    )
