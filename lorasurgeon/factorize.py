"""``factorize`` and ``densify``: rewrite weights W (m×n) as U (m×k) · V (k×n), streaming.

The output is the factorized format of GUIDE §3: ``P.weight`` becomes ``P.weight_u`` and
``P.weight_v`` (balanced split U·diag(√S), diag(√S)·Vᵀ); conv ``P`` (groups 1) becomes a k×k conv
``P.weight_v`` (k×in×kh×kw) and a 1×1 conv ``P.weight_u`` (out×k×1×1); the metadata key
``lorasurgeon`` holds ``{"format": "factorized", "version": 1, "layers": {...}}`` plus provenance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorasurgeon._args import one_or_many
from lorasurgeon._finite import json_safe
from lorasurgeon.calibrate import CalibrationOptions
from lorasurgeon.calibrate import CalibrationSession as _Calibrated
from lorasurgeon.errors import FormatError, InvalidOptionError, MatchError, UnsupportedError
from lorasurgeon.io.adapters import refuse_adapter
from lorasurgeon.io.checkpoint import ST_DTYPES, Checkpoint
from lorasurgeon.io.writer import (
    METADATA_KEY,
    TensorSpec,
    check_folder_name,
    check_output,
    provenance,
    require_output,
    write_like_input,
)
from lorasurgeon.nn.layers import factorized_layers
from lorasurgeon.nn.models import conv_groups, folder_module_kinds, module_kinds
from lorasurgeon.nn.targeting import default_excluded, matches, module_of, select
from lorasurgeon.ops import ranks, svd

SCHEMA = "lorasurgeon.factorize/1"
ProgressFn = Callable[[int, int, str], None]
RULE_OPTIONS = ("rank", "ratio", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "budget")


@dataclass
class LayerReport:
    """One layer of a factorize report. ``rel_error`` is ||W − UV||_F / ||W||_F. With calibration,
    ``energy_kept`` is measured in the method's transformed space, and the error there is
    ``output_error`` for svd-llm (exactly ||(W − UV)X|| / ||WX|| on the calibration inputs) or
    ``weighted_error`` for asvd and fwsvd (their weighted error, not an output error: their
    statistics cannot give one)."""

    module: str
    kind: str  # linear | conv2d
    shape: list[int]
    rank: int | None  # None: stays dense
    status: str  # "factorized" | "dense: ..." reason
    params_before: int
    params_after: int
    rel_error: float
    energy_kept: float
    output_error: float | None = None
    weighted_error: float | None = None


@dataclass
class FactorizeResult:
    schema: str
    input: str
    output: str | None
    dry_run: bool
    rule: dict[str, Any]
    svd: str
    layers: list[LayerReport]
    skipped: list[dict[str, str]]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    compression: float
    factorized_params_before: int = 0
    factorized_params_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. an --include pattern that matched nothing

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass
class _Candidate:
    module: str
    tensor: str
    kind: str
    shape: tuple[int, ...]
    m: int
    n: int


def _candidates(
    ck: Checkpoint,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    min_params: int,
    allow_unmatched: bool,
    conv_groups: dict[str, int] | None = None,
    kinds: dict[str, str] | None = None,
) -> tuple[list[_Candidate], list[dict[str, str]], list[str]]:
    """The weights to factorize (and the patterns, allowed by ``allow_unmatched``, that matched
    nothing). A 4-D weight needs groups = 1, which a state dict cannot show:
    it qualifies when the model confirms it (``conv_groups`` from a loaded model, or ``kinds``
    from a model folder's config) or when an --include pattern names it.

    ``kinds`` (``nn.models.folder_module_kinds``): a model folder's module types. With them,
    embeddings are known by type, not name, and a weight whose module a factorized folder could
    not rebuild (a GPT-2 Conv1D, or a name the model does not have because transformers renames
    the checkpoint's tensors on load) is refused here, not found unloadable later.

    Raises:
        MatchError: nothing to factorize. UnsupportedError: such a weight is selected.
    """
    weights = [n for n in ck.names() if n.endswith(".weight") and len(ck.info(n).shape) in (2, 4)]
    sel = select(ck.names(), include, exclude, allow_unmatched=allow_unmatched, what="tensor")
    chosen = set(sel.selected)
    out: list[_Candidate] = []
    skipped: list[dict[str, str]] = []
    for n in weights:
        if n not in chosen:
            continue
        info = ck.info(n)
        mod = module_of(n)
        if info.dtype not in ("F16", "BF16", "F32", "F64"):
            skipped.append({"module": mod, "reason": f"dtype {info.dtype} is not floating point"})
            continue
        kind_here = kinds.get(mod) if kinds is not None else None
        if kinds is not None:
            if kind_here == "embedding":
                skipped.append({"module": mod, "reason": "an nn.Embedding (a lookup table): not factorized"})
                continue
            if kind_here == "other":
                skipped.append({"module": mod, "reason": "not a Linear or Conv2d in the model"})
                continue
            if kind_here == "linear-raw":
                skipped.append({"module": mod, "reason": "nn.MultiheadAttention reads this out_proj's weight directly: "
                                "stays dense"})
                continue
            if kind_here == "conv1d":
                conv1d = sorted(c for c in {module_of(w) for w in weights if w in chosen} if kinds.get(c) == "conv1d")
                raise UnsupportedError(
                    f"{len(conv1d)} selected weight(s) are GPT-2 style Conv1D layers (e.g. {conv1d[0]!r}); a factorized "
                    "folder holds Linear and Conv2d layers, so nothing could load it: exclude them (-x)", ck.path)
            if kind_here is None:
                raise UnsupportedError(
                    f"the folder's tensor {n!r} has no module of that name in the model its config.json builds "
                    "(transformers renames some models' tensors on load, e.g. ViT in transformers 5; or the weights "
                    "come from another class), so a factorized folder could not be loaded: exclude it (-x), or "
                    "factorize the weights with --arch", ck.path)
        elif default_excluded(n, include):
            skipped.append({"module": mod, "reason": "embedding (default exclude; name it with --include)"})
            continue
        shape = info.shape
        if len(shape) == 4:
            named = bool(include) and any(matches(n, p) and p not in ("*",) for p in include)
            groups = (conv_groups or {}).get(mod)
            if groups is None and kind_here in ("conv2d", "conv2d-grouped"):
                groups = 1 if kind_here == "conv2d" else 0  # 0: grouped, count unknown here
            if groups is not None and groups != 1:
                skipped.append({"module": mod, "reason": "grouped conv stays dense" if groups == 0
                                else f"grouped conv (groups={groups}) stays dense"})
                continue
            if not named and groups is None:
                skipped.append({"module": mod, "reason": "conv: groups unknown from a state dict; name it with --include"})
                continue
            kind, m, k = "conv2d", shape[0], shape[1] * shape[2] * shape[3]
        else:
            kind, m, k = "linear", shape[0], shape[1]
        if min(m, k) < 2:
            skipped.append({"module": mod, "reason": f"too small to factorize ({m}×{k})"})
            continue
        if info.numel < min_params:
            skipped.append({"module": mod, "reason": f"{info.numel} parameters < --min-params {min_params}"})
            continue
        out.append(_Candidate(mod, n, kind, shape, m, k))
    if not out:
        raise MatchError("no weight to factorize among the selected tensors (2-D Linear or named conv weights in fp16, "
                         "bf16, fp32 or fp64)" + (f"; skipped: {skipped[0]['module']} ({skipped[0]['reason']})"
                                                  if len(skipped) == 1 else ""), ck.path)
    return out, skipped, sel.unmatched_patterns


def make_rule(
    *, rank: int | None = None, ratio: float | None = None, energy: float | None = None,
    sv_ratio: float | None = None, sv_fro: float | None = None, sv_cumulative: float | None = None,
    budget: float | None = None, max_rank: int | None = None, allow_budget: bool = True, kohya_legacy: bool = False,
) -> tuple[ranks.RankRule | None, float | None]:
    """Exactly one rank option; returns (per-layer rule, None) or (None, budget fraction).
    ``allow_budget`` False for commands without --budget (resize, extract): not offered."""
    given = {k: v for k, v in dict(rank=rank, ratio=ratio, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro,
                                  sv_cumulative=sv_cumulative, budget=budget).items() if v is not None}
    if len(given) != 1:
        names = ", ".join("--" + k.replace("_", "-") for k in RULE_OPTIONS if allow_budget or k != "budget")
        raise InvalidOptionError(f"give exactly one rank option of {names}" + (f"; got {len(given)}" if given else ""))
    (kind, value), = given.items()
    if kind == "budget":
        if not (0 < value <= 1):
            raise InvalidOptionError(f"--budget must be in (0, 1], got {value:g}")
        if max_rank is not None:
            raise InvalidOptionError("--max-rank does not combine with --budget")
        if kohya_legacy:
            raise InvalidOptionError("--kohya-legacy applies to --sv-ratio, --sv-fro and --sv-cumulative, not --budget")
        return None, float(value)
    return ranks.RankRule(kind, float(value), max_rank, kohya_legacy), None


def factorize_checkpoint(
    inp: str | Path,
    out: str | Path | None,
    *,
    rule: ranks.RankRule | None = None,
    budget: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_params: int = 0,
    svd_method: str = "auto",
    fp64: bool = False,
    seed: int = 0,
    force: bool = False,
    dry_run: bool = False,
    allow_unmatched: bool = False,
    progress: ProgressFn | None = None,
    calibration: CalibrationOptions | None = None,
    arch: str | None = None,
) -> FactorizeResult:
    """Factorize the selected weights of a checkpoint, one tensor at a time.

    Args:
        inp: any checkpoint ``Checkpoint.open`` reads; a model folder gives a model folder out.
        out: the output ``.safetensors`` file (or folder); None only with ``dry_run``.
        rule: per-layer rank rule; or ``budget``: a fraction of the selected layers' parameters,
            allocated across layers to minimise the total squared Frobenius error.
        include, exclude: globs selecting tensors; 4-D conv weights need to be named by include.
        arch: ``module:factory`` building the model (no weights needed): its convs' ``groups``
            decide which 4-D weights qualify (grouped convs stay dense), as a calibrated run's
            loaded model does.
        min_params: leave smaller weights dense.
        svd_method: exact | randomized | auto.
        fp64: SVD in fp64.
        seed: for the randomized SVD.
        force, dry_run, allow_unmatched, progress: as the CLI options.
        calibration: data-aware factorization (svd-llm, asvd, fwsvd) and the fidelity gate; needs
            a runnable model (a Hugging Face folder, or ``calibration.arch``, which defaults to ``arch``).

    Returns:
        FactorizeResult with per-layer rank, parameters, relative error and energy kept.

    Raises:
        InvalidOptionError, MatchError, FormatError (NaN/Inf weights, not a checkpoint),
        OutputExistsError, WriteError.
    """
    if (rule is None) == (budget is None):
        raise InvalidOptionError("give exactly one of a rank rule or --budget")
    if rule is not None:
        ranks.check_rule(rule)
    include, exclude = one_or_many(include), one_or_many(exclude)
    if calibration is not None and calibration.arch is None and arch is not None:
        calibration = replace(calibration, arch=arch)  # one arch for both (the CLI passes it to both)
    if svd_method not in svd.SVD_METHODS:
        raise InvalidOptionError(f"--svd must be one of {', '.join(svd.SVD_METHODS)}, got {svd_method!r}")
    inp = Path(inp)
    require_output(out, dry_run)
    if out is not None and not dry_run:
        check_output(out, force, [inp], data=calibration.data if calibration else None, directory=inp.is_dir())
    try:
        # building an --arch model initialises its layers: the caller's random state is kept
        with torch.random.fork_rng(devices=[]):
            return _factorize(inp, out, rule, budget, include, exclude, min_params, svd_method, fp64, seed, force,
                              dry_run, allow_unmatched, progress, calibration, arch)
    except FormatError as e:
        if e.path is None:  # e.g. NaN in a weight: the message names the layer, the path the file
            e.path = str(inp)
        raise


def _arch_kinds(arch: str, ck: Checkpoint) -> tuple[dict[str, str], dict[str, int]]:
    """``module_kinds`` and each Conv2d's ``groups`` of the model ``arch`` builds (its
    architecture only, no weights), after checking that the checkpoint's weights are that
    model's (same names and shapes)."""
    from lorasurgeon.nn.models import build_arch

    model = build_arch(arch)
    own = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    wrong = [f"{n} {list(ck.info(n).shape)} vs {list(own[n])}" for n in ck.names()
             if n in own and tuple(ck.info(n).shape) != own[n]]
    foreign = [n for n in ck.names() if n not in own and not n.endswith(("num_batches_tracked", "position_ids"))]
    if wrong or foreign:
        raise FormatError(f"the weights are not {arch}'s: " + "; ".join(
            ([f"{len(wrong)} of another shape, e.g. {wrong[0]}"] if wrong else [])
            + ([f"{len(foreign)} it does not have, e.g. {foreign[0]!r}"] if foreign else [])), ck.path)
    return module_kinds(model), conv_groups(model)


def _factorize(
    inp: Path, out: str | Path | None, rule: ranks.RankRule | None, budget: float | None,
    include: Sequence[str] | None, exclude: Sequence[str] | None, min_params: int, svd_method: str,
    fp64: bool, seed: int, force: bool, dry_run: bool, allow_unmatched: bool, progress: ProgressFn | None,
    calibration: CalibrationOptions | None = None,
    arch: str | None = None,
) -> FactorizeResult:
    with Checkpoint.open(inp) as ck:
        refuse_adapter(inp, ck, "a model", "factorize rewrites a model's weights; re-rank an adapter with lorasurgeon resize")
        if factorized_layers(ck.metadata, inp):
            raise InvalidOptionError("input is already factorized; densify it first (factorize --densify)", inp)
        if Path(inp).is_dir() and not dry_run:
            check_folder_name(out)
        cal = _Calibrated.prepare(inp, calibration) if calibration is not None else None
        groups = cal.conv_groups if cal else None
        if arch is None:
            kinds = folder_module_kinds(inp)
        elif cal:  # the model the calibration built
            kinds = module_kinds(cal.lm.model)
        else:  # the architecture alone
            kinds, groups = _arch_kinds(arch, ck)
        cands, skipped, unmatched = _candidates(ck, include, exclude, min_params, allow_unmatched, groups, kinds)
        if cal is not None and not (cal.opts.sequential and rule is not None and rule.kind in ("rank", "ratio")):
            # (sequential with a shape-only rule: its own passes give every layer's statistics)
            cal.collect([c.module for c in cands], progress)
        ranks_by_module = _plan_ranks(ck, cands, rule, budget, fp64, progress, cal)
        reports: dict[str, LayerReport] = {}
        layers_meta: dict[str, dict[str, Any]] = {}
        for c in cands:
            k = ranks_by_module[c.module]
            if k is None:
                reports[c.module] = LayerReport(c.module, c.kind, list(c.shape), None,
                                                "dense: a rank that saves parameters does not meet the rule"
                                                if rule is not None else "dense: the budget keeps it dense",
                                                c.m * c.n, c.m * c.n, 0.0, 1.0)
            else:
                layers_meta[c.module] = {"kind": c.kind, "rank": k, "shape": list(c.shape)}
        factor_names = {c.tensor: c for c in cands if ranks_by_module[c.module] is not None}
        specs: list[TensorSpec] = []
        for n in ck.names():
            info = ck.info(n)
            dt = ST_DTYPES[info.dtype]
            if n in factor_names:
                c = factor_names[n]
                k = ranks_by_module[c.module]
                if c.kind == "linear":
                    specs += [TensorSpec(f"{c.module}.weight_u", dt, (c.m, k)), TensorSpec(f"{c.module}.weight_v", dt, (k, c.shape[1]))]
                else:
                    specs += [TensorSpec(f"{c.module}.weight_u", dt, (c.m, k, 1, 1)),
                              TensorSpec(f"{c.module}.weight_v", dt, (k, *c.shape[1:]))]
            else:
                specs.append(TensorSpec(n, dt, info.shape))
        bytes_before = ck.total_bytes
        bytes_after = sum(s.nbytes for s in specs)
        options = {"rule": _rule_json(rule, budget), "include": list(include or []), "exclude": list(exclude or []),
                   "min_params": min_params, "svd": svd_method, "fp64": fp64, "seed": seed}
        if calibration is not None:
            options["calibration"] = calibration.to_options()
        result = FactorizeResult(
            schema=SCHEMA, input=str(inp), output=None if dry_run else str(out), dry_run=dry_run,
            rule=_rule_json(rule, budget), svd=svd_method, layers=[], skipped=skipped,
            params_before=ck.total_params, params_after=sum(_numel(s.shape) for s in specs),
            bytes_before=bytes_before, bytes_after=bytes_after,
            compression=round(bytes_before / bytes_after, 4) if bytes_after else 0.0,
            warnings=[f"{u} matches no tensor (allowed by --allow-unmatched)" for u in unmatched],
        )
        if cands and not layers_meta:  # a plain copy: distill and --densify will not take it as factorized
            result.warnings.append(f"no layer was factorized: every one of the {len(cands)} selected layer(s) stays dense "
                                   "(see each layer's status), so the output is a dense copy")
        if dry_run:
            for c in cands:
                k = ranks_by_module[c.module]
                result.layers.append(reports.get(c.module) or LayerReport(
                    c.module, c.kind, list(c.shape), k, "factorized (planned)", c.m * c.n, k * (c.m + c.n), float("nan"), float("nan")))
            _totals(result)
            return result

        precomputed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if cal is not None:
            # Calibrated: all factors first (the model is in memory anyway), then the gate.
            cal.fit_sequential({c.module: ranks_by_module[c.module] for c in factor_names.values()},  # type: ignore[misc]
                               svd_method, seed, progress)
            for i, c in enumerate(factor_names.values()):
                if progress:
                    progress(i, len(factor_names), f"factorize {c.module}")
                w = ck.get(c.tensor)
                precomputed[c.module], reports[c.module] = cal.factorize(w, ranks_by_module[c.module], c, svd_method, fp64, seed)
                del w
            result.extra["fidelity"] = cal.gate(precomputed)
            result.extra["calibration"] = cal.summary()

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            todo = ck.names()
            for i, n in enumerate(todo):
                if progress:
                    progress(i, len(todo), n)
                c = factor_names.get(n)
                if c is None:
                    yield n, ck.get(n)
                    continue
                if c.module in precomputed:
                    u, v = precomputed.pop(c.module)
                else:
                    t = ck.get(n)
                    u, v, reports[c.module] = factorize_weight(t, ranks_by_module[c.module], c, svd_method, fp64, seed)
                    del t
                yield f"{c.module}.weight_u", u
                yield f"{c.module}.weight_v", v
            if progress:
                progress(len(todo), len(todo), "")

        meta = {k: v for k, v in ck.metadata.items() if k != METADATA_KEY}
        meta[METADATA_KEY] = provenance(
            "factorize", options, [inp], extra={"format": "factorized", "layers": dict(sorted(layers_meta.items()))}
        )
        write_like_input(ck, inp, Path(out), specs, stream(), meta, force)
    result.layers = [reports[c.module] for c in cands]
    _totals(result)
    return result


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _totals(result: FactorizeResult) -> None:
    result.factorized_params_before = sum(r.params_before for r in result.layers)
    result.factorized_params_after = sum(r.params_after for r in result.layers)


def _rule_json(rule: ranks.RankRule | None, budget: float | None) -> dict[str, Any]:
    if rule is None:
        return {"kind": "budget", "value": budget}
    return ranks.rule_json(rule)


def _plan_ranks(
    ck: Checkpoint, cands: list[_Candidate], rule: ranks.RankRule | None, budget: float | None,
    fp64: bool, progress: ProgressFn | None, cal: _Calibrated | None = None,
) -> dict[str, int | None]:
    """Ranks per module. Fixed-rank and ratio rules need only shapes; the others need each
    layer's singular values (one layer in memory at a time). With calibration those are the
    singular values of the method's transformed matrix (for svd-llm, W·S), so energy rules and
    the budget act on the output error instead of the weight error."""
    if rule is not None and rule.kind in ("rank", "ratio"):
        out = {}
        for c in cands:
            k = ranks.select_rank(torch.ones(min(c.m, c.n)), rule)  # depends on n only
            out[c.module] = ranks.apply_break_even(k, c.m, c.n)
        return out
    spectra: list[ranks.LayerSpectrum] = []
    for i, c in enumerate(cands):
        if progress:
            progress(i, len(cands), f"spectrum {c.module}")
        w = ck.get(c.tensor)
        S = svd.singular_values(cal.transformed(c.module, w) if cal else w, fp64=fp64, name=c.tensor)
        del w
        spectra.append(ranks.LayerSpectrum(c.module, c.m, c.n, S))
    if rule is not None:
        return {sp.name: ranks.choose_layer_rank(sp.S, sp.m, sp.n, rule) for sp in spectra}
    assert budget is not None
    total = ranks.budget_from_fraction(spectra, budget)
    alloc = ranks.allocate_budget(spectra, total)
    return {sp.name: k for sp, k in zip(spectra, alloc)}


def factorize_weight(
    w: torch.Tensor, k: int, c: _Candidate | None = None, method: str = "auto", fp64: bool = False, seed: int = 0,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, LayerReport]:
    """One weight to balanced factors (U·diag(√S), diag(√S)·Vᵀ), cast back to its dtype once.

    Returns:
        (weight_u, weight_v, report): linear (m×k, k×n); conv (out×k×1×1, k×in×kh×kw).
    """
    shape = tuple(w.shape)
    nm = name or (c.tensor if c else None)
    res = svd.truncated_svd(w, k, method=method, fp64=fp64, seed=seed, name=nm)
    uf, vf = svd.split_balanced(res)
    err, ref = svd.residual_norms(w, res)  # one blockwise pass, one reused buffer
    rel = svd.ratio_of_norms(err, ref)
    total = ref * ref
    kept = float((res.S.double() ** 2).sum().item()) / total if total > 0 else 1.0
    if len(shape) == 4:
        u = uf.reshape(shape[0], k, 1, 1).to(w.dtype).contiguous()
        v = vf.reshape(k, *shape[1:]).to(w.dtype).contiguous()
        kind, m, n = "conv2d", shape[0], shape[1] * shape[2] * shape[3]
    else:
        u, v = uf.to(w.dtype).contiguous(), vf.to(w.dtype).contiguous()
        kind, m, n = "linear", shape[0], shape[1]
    rep = LayerReport(c.module if c else (module_of(nm) if nm else ""), kind, list(shape), k, "factorized",
                      m * n, k * (m + n), round(rel, 6), round(min(kept, 1.0), 6))
    return u, v, rep


# --------------------------------------------------------------------------- densify
@dataclass
class DensifyResult:
    schema: str
    input: str
    output: str
    layers: int
    params_before: int
    params_after: int

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def densify_checkpoint(inp: str | Path, out: str | Path, *, force: bool = False,
                       progress: ProgressFn | None = None) -> DensifyResult:
    """A factorized checkpoint back to the dense layout: W = weight_u @ weight_v (fp32, cast once),
    so any tool reads it.

    Raises:
        FormatError: not a factorized checkpoint or a layer's factors are missing.
    """
    inp = Path(inp)
    check_output(out, force, [inp], directory=inp.is_dir())
    with Checkpoint.open(inp) as ck:
        layers = factorized_layers(ck.metadata, inp)
        if not layers:
            raise FormatError("not a lorasurgeon factorized checkpoint (no 'lorasurgeon' layers metadata)", inp)
        factor_of: dict[str, str] = {}
        specs: list[TensorSpec] = []
        for mod, spec in sorted(layers.items()):
            for part in ("weight_u", "weight_v"):
                if f"{mod}.{part}" not in ck:
                    raise FormatError(f"factorized layer {mod!r} has no {part}", inp)
                factor_of[f"{mod}.{part}"] = mod
            # The metadata must agree with the factors (GUIDE §3), else U·V cannot be its shape.
            shape, k = list(spec["shape"]), spec["rank"]
            want = [[shape[0], k], [k, shape[1]]] if spec.get("kind", "linear") == "linear" else [
                [shape[0], k, 1, 1], [k, *shape[1:]]]
            got = [list(ck.info(f"{mod}.weight_u").shape), list(ck.info(f"{mod}.weight_v").shape)]
            if got != want:
                raise FormatError(f"factorized layer {mod!r}: factors {got[0]} and {got[1]} do not match its metadata "
                                  f"(rank {k}, shape {shape})", inp)
            dt = ST_DTYPES[ck.info(f"{mod}.weight_u").dtype]
            specs.append(TensorSpec(f"{mod}.weight", dt, tuple(spec["shape"])))
        for n in ck.names():
            if n not in factor_of:
                specs.append(TensorSpec(n, ST_DTYPES[ck.info(n).dtype], ck.info(n).shape))

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for i, (mod, spec) in enumerate(sorted(layers.items())):
                if progress:
                    progress(i, len(layers), mod)
                u = ck.get(f"{mod}.weight_u")
                v = ck.get(f"{mod}.weight_v")
                w = svd.as_matrix(u).float() @ svd.as_matrix(v).float()
                yield f"{mod}.weight", w.reshape(spec["shape"]).to(u.dtype)
            for n in ck.names():
                if n not in factor_of:
                    yield n, ck.get(n)

        meta = {k: v for k, v in ck.metadata.items() if k != METADATA_KEY}
        meta[METADATA_KEY] = provenance("densify", {}, [inp], extra={"format": "dense"})
        write_like_input(ck, inp, Path(out), specs, stream(), meta, force)
        before = ck.total_params
    after = sum(_numel(s.shape) for s in specs)
    return DensifyResult("lorasurgeon.densify/1", str(inp), str(out), len(layers), before, after)


def factorize_module(
    model: nn.Module,
    rule: ranks.RankRule,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_params: int = 0,
    svd_method: str = "auto",
    fp64: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, list[LayerReport]]:
    """Factorize a model you hold: a copy whose selected layers are low-rank twins, in memory.

    The in-memory ``factorize_checkpoint``: every ``nn.Linear`` and ``nn.Conv2d`` with groups 1
    (grouped convs cannot be factorized) whose weight name matches ``include`` (all when None)
    and no ``exclude`` becomes a ``LowRankLinear`` / ``LowRankConv2d`` holding the truncated
    SVD's balanced factors, cast back to the layer's dtype once; biases are copied. The rule
    decides each rank as in ``factorize``; a rank that would not save parameters (at or above
    the break-even rank) leaves the layer dense. A module registered under several names is
    factorized once and stays shared under all of them (its report has the first name).
    ``nn.MultiheadAttention``'s ``out_proj`` stays dense (the attention reads its weight
    directly). ``model`` itself is not changed.

    Returns:
        (the factorized copy, one LayerReport per selected layer: rank, parameters, relative
        error, energy kept; status "factorized" or "dense: <why>" (the rule, ``min_params``,
        ``out_proj``), as factorize).

    Raises:
        InvalidOptionError: not a RankRule, a bad ``svd_method``; MatchError: a pattern matches
            no layer, or the model has no layer to factorize (GPT-2's Conv1D layers are not
            Linear: convert the model first); FormatError: NaN/Inf in a weight.
    """
    from lorasurgeon.nn.layers import LowRankConv2d, LowRankLinear

    ranks.check_rule(rule)
    if svd_method not in svd.SVD_METHODS:
        raise InvalidOptionError(f"--svd must be one of {', '.join(svd.SVD_METHODS)}, got {svd_method!r}")
    kinds = module_kinds(model)
    names: dict[int, list[str]] = {}  # a module under each of its names (a shared module has several)
    for n, m in model.named_modules(remove_duplicate=False):
        if kinds.get(n) in ("linear", "linear-raw", "conv2d"):
            names.setdefault(id(m), []).append(n)
    if not names:
        conv1d = sorted(n for n, k in kinds.items() if k == "conv1d")
        raise MatchError("the model has no nn.Linear or nn.Conv2d (groups 1) layer to factorize"
                         + (f"; its {len(conv1d)} GPT-2 Conv1D layers (e.g. {conv1d[0]!r}) store their weights "
                            "transposed and are not factorized" if conv1d else ""))
    exclude = one_or_many(exclude)
    chosen = set(select([f"{n}.weight" for ns in names.values() for n in ns], one_or_many(include),
                        exclude, can_allow=False, what="Linear or Conv2d (groups 1) weight").selected)
    out = copy.deepcopy(model)
    reports: list[LayerReport] = []
    for aliases in names.values():
        # a shared module is one layer: chosen under any of its names, kept dense when any is excluded
        if not any(f"{n}.weight" in chosen for n in aliases) or any(
                matches(f"{n}.weight", p) for n in aliases for p in exclude or []):
            continue
        name = aliases[0]
        old = model.get_submodule(name)
        w = old.weight.detach()
        m, n = w.shape[0], w[0].numel()
        kind = "conv2d" if w.ndim == 4 else "linear"

        def dense(why: str, name: str = name, kind: str = kind, w: torch.Tensor = w, size: int = m * n) -> None:
            reports.append(LayerReport(name, kind, list(w.shape), None, f"dense: {why}", size, size, 0.0, 1.0))

        if kinds[name] == "linear-raw":
            dense("nn.MultiheadAttention reads this out_proj's weight directly")
            continue
        if m * n < min_params:
            dense(f"{m * n} parameters < min_params {min_params}")
            continue
        S = svd.singular_values(w, fp64=fp64, name=f"{name}.weight") if rule.kind not in ("rank", "ratio") else torch.ones(min(m, n))
        k = ranks.choose_layer_rank(S, m, n, rule)
        if k is None:
            dense("a rank that saves parameters does not meet the rule")
            continue
        u, v, rep = factorize_weight(w, k, None, svd_method, fp64, seed, name=f"{name}.weight")
        new: nn.Module = LowRankLinear.from_linear(old, k) if isinstance(old, nn.Linear) else LowRankConv2d(old, k)
        with torch.no_grad():
            new.weight_u.copy_(u)
            new.weight_v.copy_(v)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.train(old.training)
        for alias in aliases:
            parent_name, _, child = alias.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, new)
        reports.append(rep)
    return out, reports
