"""``resize`` (re-rank a LoRA by exact factor algebra) and ``extract`` (tuned − base → LoRA)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._args import one_or_many
from lorasurgeon._finite import all_finite, result_json_without_adapter
from lorasurgeon._threads import torch_threads
from lorasurgeon.errors import FormatError, InvalidOptionError, MatchError, UnsupportedError
from lorasurgeon.io.adapters import (
    Adapter,
    LoraTarget,
    adapter_state,
    check_component,
    name_part,
    read_adapter,
    refuse_adapter,
    refuse_base_changing,
    refuse_lossy_stems,
    write_adapter,
)
from lorasurgeon.io.checkpoint import ST_DTYPES, Checkpoint
from lorasurgeon.io.writer import METADATA_KEY, HashedInputs, check_output, provenance
from lorasurgeon.nn.layers import factorized_layers
from lorasurgeon.nn.targeting import default_excluded, module_of, select
from lorasurgeon.ops import ranks, svd

ProgressFn = Callable[[int, int, str], None]


@dataclass
class ResizeLayer:
    module: str
    shape: list[int]
    rank_before: int
    rank_after: int
    alpha_before: float
    alpha_after: float
    scale: float
    fro_kept: float  # ||B'A'||_F / ||BA||_F (the Frobenius fraction kept), as computed
    cast_error: float = 0.0  # ||B'A' − B'A'(computed)||_F / ||B'A'|| from storing the factors in the input dtype


@dataclass
class ResizeResult:
    schema: str
    input: str
    output: str | None
    format: str
    rule: dict[str, Any]
    dry_run: bool
    layers: list[ResizeLayer]
    params_before: int
    params_after: int
    warnings: list[str] = field(default_factory=list)
    # the re-ranked adapter itself (not in the JSON): what was written, or the in-memory result
    adapter: Adapter | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return result_json_without_adapter(self)


def _rule_json(rule: ranks.RankRule) -> dict[str, Any]:
    return ranks.rule_json(rule)


def resize_target(
    t: LoraTarget, rule: ranks.RankRule, fp64: bool = False, rslora: bool = False
) -> tuple[LoraTarget, float, float]:
    """Re-rank one target exactly: SVD of B·A by QR of the factors (no dense delta); S goes
    into B, A stays orthonormal; alpha is rewritten so the scale alpha/r is unchanged.

    The rule sees the r singular values padded with zeros to min(out, in) of the dense delta,
    as kohya's resize_lora does. ``ratio`` is a fraction of the adapter's current rank.

    Returns:
        (new target, Frobenius fraction kept, cast error): the last is what storing the new
        factors in the input's dtype (bf16, fp16) changed, relative (0 for fp32/fp64 inputs).
    """
    psvd = svd.product_svd(t.B, t.A, fp64=fp64)
    out_dim = t.B.shape[0]
    in_dim = svd.as_matrix(t.A).shape[1]
    n = min(out_dim, in_dim)
    padded = torch.zeros(n, dtype=torch.float64)
    padded[: psvd.S.numel()] = psvd.S.double()
    if rule.kind == "ratio":
        k = max(1, math.floor(rule.value * t.rank + 0.5 + 1e-9))
        if rule.max_rank is not None:
            k = min(k, rule.max_rank)
    else:
        k = ranks.select_rank(padded, rule)
    k = max(1, min(k, t.rank, psvd.S.numel()))
    res = psvd.truncate(k)  # only the kept k vectors are projected back
    B0, A0 = res.U * res.S, res.Vh
    B, A = B0.to(t.B.dtype), A0.to(t.A.dtype)
    cast = 0.0 if (B.dtype, A.dtype) == (B0.dtype, A0.dtype) else svd.product_rel_diff(B, A, B0, A0)
    if t.is_conv:
        B = B.reshape(out_dim, k, 1, 1)
        A = A.reshape(k, *t.A.shape[1:])
    total = float((psvd.S.double() ** 2).sum())
    kept = math.sqrt(float((psvd.S[:k].double() ** 2).sum()) / total) if total > 0 else 1.0
    alpha = t.scale * (math.sqrt(k) if rslora else k)
    return LoraTarget(t.module, A.contiguous(), B.contiguous(), alpha, t.scale, None, t.bias, t.fan_in_fan_out), kept, cast


def resize_adapter(
    inp: str | Path | Adapter, out: str | Path | None, rule: ranks.RankRule, *, fmt: str | None = None,
    fp64: bool = False, force: bool = False, dry_run: bool = False, progress: ProgressFn | None = None,
    component: str | None = None,
) -> ResizeResult:
    """Re-rank every target of a LoRA adapter by the rule, exactly (see ``resize_target``).

    Args:
        inp: an adapter path, or an ``Adapter`` you hold (then ``out`` must be None).
        out: the output; None re-ranks in memory and writes nothing (``result.adapter``).
        fmt: the output layout (peft, kohya or diffusers); None keeps the input's.
        component: a kohya or diffusers output's pipeline part, for targets whose names say none
            (``io.adapters.name_part``); without it such targets give a warning.

    Returns:
        ResizeResult with each layer's old and new rank and the energy kept, and the re-ranked
        adapter as ``.adapter``.

    Raises:
        InvalidOptionError: a bad ``fmt`` or ``rule``, an ``Adapter`` with an ``out``.
        UnsupportedError: DoRA adapters (the magnitude depends on the base weight).
        FormatError, OutputExistsError, WriteError.
    """
    if fmt is not None and fmt not in ("peft", "kohya", "diffusers"):
        raise InvalidOptionError(f"--format must be peft, kohya or diffusers, got {fmt!r}")
    ranks.check_rule(rule)
    writes = out is not None and not dry_run
    held = inp if isinstance(inp, Adapter) else None
    if held is not None:
        if writes:
            raise InvalidOptionError("an Adapter object is resized in memory: pass out=None, then write result.adapter "
                                     "with write_adapter")
        inp = held.source or "adapter"
    if writes:
        check_output(out, force, [inp], directory=None if fmt is None else fmt == "peft")  # type: ignore[arg-type]
    # The input is hashed (provenance) on a second thread while it is read and parsed: for
    # adapter-sized inputs the sha256 is done by the time the layers are re-ranked.
    hashes = HashedInputs([inp]) if writes else None
    ad = held if held is not None else read_adapter(inp)
    check_component(fmt or ad.format, component)
    refuse_lossy_stems(ad, fmt or ad.format, inp)
    if any(t.magnitude is not None for t in ad.targets.values()):
        raise UnsupportedError("resizing a DoRA adapter is ill-posed without its base weights; merge it instead", inp)
    refuse_base_changing(ad, "peft would take a different amount out of the base at another rank")
    new: dict[str, LoraTarget] = {}
    layers: list[ResizeLayer] = []
    # one thread: the per-layer algebra (a QR per factor, an r x r SVD) is too small for two
    with torch_threads(1):
        for i, (m, t) in enumerate(sorted(ad.targets.items())):
            if progress:
                progress(i, len(ad.targets), m)
            nt, kept, cast = resize_target(t, rule, fp64, ad.use_rslora)
            new[m] = nt
            layers.append(ResizeLayer(m, list(t.delta_shape()), t.rank, nt.rank, t.alpha, nt.alpha, t.scale,
                                      round(kept, 6), round(cast, 8)))
    result = ResizeResult(
        "lorasurgeon.resize/1", str(inp), str(out) if writes else None, fmt or ad.format, _rule_json(rule), dry_run, layers,
        sum(t.A.numel() + t.B.numel() for t in ad.targets.values()),
        sum(t.A.numel() + t.B.numel() for t in new.values()),
    )
    # new containers (the caller's adapter stays its own); the input's provenance is not this one's
    resized = Adapter(fmt or ad.format, new, dict(ad.modules_to_save),
                      {k: v for k, v in ad.metadata.items() if k != METADATA_KEY}, dict(ad.config), ad.use_rslora, ad.source)
    resized, note = name_part(resized, fmt or ad.format, component)
    if note:
        result.warnings.append(note)
    result.adapter = resized
    if not writes:  # what writing would refuse (e.g. modules_to_save in a diffusers file) is refused here too
        adapter_state(resized, fmt or ad.format)
    else:
        prov = provenance("resize", {"rule": _rule_json(rule), "fp64": fp64, "format": fmt or ad.format,
                                     **({"component": component} if component else {})}, hashes)
        write_adapter(resized, out, fmt or ad.format, provenance_meta=prov, force=force)
    return result


# --------------------------------------------------------------------------- extract
def _pair_names(base: list[str], tuned: list[str]) -> tuple[dict[str, str], str | None]:
    """Tuned tensor name -> the base's name for it. Equal names pair; when a first name part
    (``bert.``) on one side pairs more tensors than equal names do, it is dropped or added."""
    bset, tset = set(base), set(tuned)
    same = {n: n for n in tuned if n in bset}
    best, note = same, None

    def first_parts(names: list[str], other: set[str]) -> list[str]:
        counts: dict[str, int] = {}
        for n in names:
            if n not in other and "." in n:
                counts[n.split(".", 1)[0]] = counts.get(n.split(".", 1)[0], 0) + 1
        return sorted(counts, key=lambda p: (-counts[p], p))[:3]

    # a prefixed name pairs only with a base name the tuned model does not hold itself: copies
    # under a prefix beside the weights (an EMA's ema.<name>) stay the tuned model's own tensors
    for p in first_parts(tuned, bset):  # the tuned model has the longer names
        cand = {**same, **{n: n[len(p) + 1:] for n in tuned
                           if n.startswith(p + ".") and n[len(p) + 1:] in bset and n[len(p) + 1:] not in tset}}
        if len(cand) > len(best):
            best, note = cand, f"the tuned model's names start with {p + '.'!r} where the base's do not: paired without it"
    for p in first_parts(base, tset):  # the base has the longer names
        cand = {**same, **{n: f"{p}.{n}" for n in tuned if f"{p}.{n}" in bset and f"{p}.{n}" not in tset}}
        if len(cand) > len(best):
            best, note = cand, f"the base's names start with {p + '.'!r} where the tuned model's do not: paired with it"
    return best, note


@dataclass
class ExtractLayer:
    module: str
    shape: list[int]
    rank: int
    delta_norm: float
    rel_error: float  # ||ΔW − B·A||_F / ||ΔW||_F
    cast_error: float = 0.0  # ||B'A' − B·A||_F / ||B·A||_F from storing the factors in the weights' dtype (bf16, fp16)


@dataclass
class ExtractResult:
    schema: str
    base: str
    tuned: str
    output: str | None
    format: str
    rule: dict[str, Any]
    dry_run: bool
    layers: list[ExtractLayer]
    unchanged: list[str]
    other_changed: list[str]
    saved_other: list[str]
    adapter_params: int
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # the extracted adapter itself (not in the JSON): what was written, or the in-memory result
    adapter: Adapter | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return result_json_without_adapter(self)


def extract_adapter(
    base: str | Path, tuned: str | Path, out: str | Path | None, rule: ranks.RankRule, *,
    fmt: str = "peft", include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
    save_other: bool = False, svd_method: str = "auto", fp64: bool = False, seed: int = 0,
    force: bool = False, dry_run: bool = False, progress: ProgressFn | None = None, component: str | None = None,
) -> ExtractResult:
    """LoRA from a fine-tune: per 2-D/conv weight, ΔW = tuned − base (fp32), truncated SVD by the
    rule (S into B), alpha = rank so the scale is 1. Zero deltas are skipped; other changed
    tensors (biases, norms, new heads) are reported and, with ``save_other``, saved whole per
    module as modules_to_save. Streams one tensor pair at a time.

    Names: the adapter's modules are the base's. A tuned model saved with a head class's names
    (``bert.encoder...`` beside a bare ``encoder...`` base, as ``attach --full`` writes) is paired
    by its first name part, with a warning; base weights the tuned model lacks get no LoRA and
    are listed (``extra.missing_in_tuned``), with a warning. ``component`` names the pipeline part
    of a kohya or diffusers output (``lora_unet_``, ``unet.``); without it such an output warns that
    loaders will not find its layers.

    ``out`` None extracts in memory and writes nothing; ``result.adapter`` is the adapter either way.

    Raises:
        FormatError: shapes differ between base and tuned; NaN/Inf in a delta.
        MatchError: no weight differs, or a pattern matches nothing.
    """
    include, exclude = one_or_many(include), one_or_many(exclude)
    ranks.check_rule(rule)
    if fmt not in ("peft", "kohya", "diffusers"):
        raise InvalidOptionError(f"--format must be peft, kohya or diffusers, got {fmt!r}")
    writes = out is not None and not dry_run
    if writes:
        check_output(out, force, [base, tuned], directory=fmt == "peft")  # type: ignore[arg-type]
    from lorasurgeon.nn.models import folder_module_kinds

    check_component(fmt, component)
    kinds = folder_module_kinds(base) or folder_module_kinds(tuned)  # a model folder's module names and types
    conv1d = {n for n, k in (kinds or {}).items() if k == "conv1d"}  # GPT-2 style: weights stored in×out
    warnings: list[str] = []
    with Checkpoint.open(base) as cb, Checkpoint.open(tuned) as ct:
        for p, c in ((base, cb), (tuned, ct)):
            refuse_adapter(p, c, "a model", "extract compares two models' weights; merge the adapter into its base first")
        for ck, what in ((cb, base), (ct, tuned)):
            if factorized_layers(ck.metadata, ck.path):  # its weights are factors: no dense delta to take
                raise UnsupportedError("is a factorized checkpoint; densify it first (factorize --densify)", what)
        base_of, prefix_note = _pair_names(cb.names(), ct.names())
        if prefix_note:
            warnings.append(prefix_note)
        names = select(ct.names(), include, exclude, what="tensor", can_allow=False).selected
        targets: dict[str, LoraTarget] = {}
        layers: list[ExtractLayer] = []
        unchanged: list[str] = []
        other: list[str] = []
        dtypes: set[tuple[str, str]] = set()
        for i, tn in enumerate(names):
            if progress:
                progress(i, len(names), tn)
            ti = ct.info(tn)
            n = base_of.get(tn)  # the base's name: the adapter's module names are the base's
            if n is None:
                other.append(tn)
                continue
            bi = cb.info(n)
            if bi.shape != ti.shape:
                raise FormatError(f"tensor {n!r} is {list(bi.shape)} in the base but {list(ti.shape)} in the tuned model", tuned)
            if bi.dtype != ti.dtype:
                dtypes.add((bi.dtype, ti.dtype))
            t_new = ct.get(tn)
            t_old = cb.get(n)
            for t, src in ((t_new, tuned), (t_old, base)):
                if not all_finite(t):
                    raise FormatError(f"tensor {n!r} holds NaN or Inf values", src)
            if torch.equal(t_new, t_old):
                unchanged.append(n)
                continue
            floating = ti.dtype in ("F16", "BF16", "F32", "F64")
            is_weight = n.endswith(".weight") and len(ti.shape) in (2, 4) and floating and min(ti.shape[0], ti.numel // ti.shape[0]) > 1
            if not is_weight or default_excluded(n, include):  # (an embedding table goes whole with --save-other)
                other.append(tn)
                continue
            delta = t_new.to(torch.float64 if fp64 else torch.float32) - t_old.to(torch.float64 if fp64 else torch.float32)
            del t_new, t_old
            m = module_of(n)
            if kinds is not None and m not in kinds:
                # PEFT finds LoRA targets by module name: one the model does not have would be ignored
                raise UnsupportedError(
                    f"the tensor {n!r} has no module of that name in the model the folder's config.json builds "
                    "(transformers renames some models' tensors on load, e.g. ViT in transformers 5): an adapter "
                    "for it would not load (exclude it with -x)", tuned)
            if kinds is not None and kinds[m] not in ("linear", "linear-raw", "conv2d", "conv1d"):  # an embedding (T5's `shared`)...
                other.append(tn)  # ... goes whole with --save-other, as named embeddings do
                continue
            fifo = m in conv1d and delta.ndim == 2
            if fifo:  # PEFT's fan_in_fan_out: B @ A is the (out×in) transpose of the stored delta
                delta = delta.T
            if rule.kind in ("rank", "ratio"):
                k = ranks.select_rank(torch.ones(min(delta.shape[0], delta[0].numel())), rule)
            else:
                k = ranks.select_rank(svd.singular_values(delta, fp64=fp64, name=n), rule)
            res = svd.truncated_svd(delta, k, method=svd_method, fp64=fp64, seed=seed, name=n)
            B0, A0 = svd.split_lora(res)
            err = svd.relative_error(delta, res)
            B = B0.to(ST_DTYPES[ti.dtype])
            A = A0.to(ST_DTYPES[ti.dtype])
            cast = 0.0 if (B.dtype, A.dtype) == (B0.dtype, A0.dtype) else svd.product_rel_diff(B, A, B0, A0)
            if delta.ndim == 4:
                B = B.reshape(delta.shape[0], k, 1, 1)
                A = A.reshape(k, *delta.shape[1:])
            targets[m] = LoraTarget(m, A.contiguous(), B.contiguous(), float(k), 1.0, fan_in_fan_out=fifo)
            layers.append(ExtractLayer(m, list(ti.shape), k, float(delta.norm()), round(err, 6), cast))
        if not targets:
            if names and not any(n in base_of for n in names):
                raise MatchError("the base and the tuned model share no tensor names, even without a first part such as "
                                 "'bert.': they are not the same model", tuned)
            raise MatchError("no weight differs between base and tuned model; nothing to extract", tuned)
        chosen_base = set(select(cb.names(), include, exclude, allow_unmatched=True).selected)
        missing = sorted(n for n in chosen_base - set(base_of.values())
                         if cb.info(n).dtype in ("F16", "BF16", "F32", "F64"))  # (not int buffers: position_ids)
        if missing:  # no delta can be taken: those layers get no LoRA
            warnings.append(f"{len(missing)} tensor(s) of the base are not in the tuned model and get no LoRA, e.g. "
                            f"{missing[0]!r} (listed in extra.missing_in_tuned)")
        for b_dt, t_dt in sorted(dtypes):
            warnings.append(f"the base holds {b_dt} and the tuned model {t_dt} tensors: their rounding counts as change "
                            "(cast one to the other's dtype first to extract only the fine-tune)")
        saved: dict[str, torch.Tensor] = {}
        lora_bias: list[str] = []
        if save_other and other:
            mods = {module_of(n) for n in other}  # (tuned names)
            for tn in ct.names():
                n = base_of.get(tn, tn)  # the base's name; a tensor only the tuned model has keeps its own
                mo = module_of(n)
                if mo in targets and tn in other and n == f"{mo}.bias" and tn in base_of:
                    # A LoRA'd module's changed bias: a LoRA bias (PEFT lora_bias, on lora_B, scaled
                    # like the delta; the scale is 1 here). modules_to_save would replace the weight too.
                    if fmt == "kohya":
                        raise UnsupportedError(f"the bias of {mo!r} changed too: kohya files hold no LoRA bias "
                                               "(PEFT's lora_bias); use --format peft or diffusers, or leave out --save-other",
                                               tuned)
                    db = ct.get(tn).to(torch.float64) - cb.get(n).to(torch.float64)
                    t = targets[mo]
                    targets[mo] = LoraTarget(mo, t.A, t.B, t.alpha, t.scale, None, (db / t.scale).to(ST_DTYPES[ct.info(tn).dtype]),
                                             t.fan_in_fan_out)
                    lora_bias.append(n)
                elif module_of(tn) in mods and mo not in targets:
                    saved[n] = ct.get(tn)
            from lorasurgeon.nn.models import tied_input_embedding

            tied = tied_input_embedding(base) if saved else None
            if tied is not None and tied in saved:
                raise UnsupportedError(
                    f"the input embeddings {tied!r} changed, and this model's output layer shares them "
                    "(tie_word_embeddings): as modules_to_save, peft would change only the input side; leave them out "
                    f"(-x '{tied}') or leave out --save-other", tuned)
    result = ExtractResult(
        "lorasurgeon.extract/1", str(base), str(tuned), str(out) if writes else None, fmt, _rule_json(rule), dry_run,
        layers, unchanged, other, sorted([*saved, *lora_bias]), sum(t.A.numel() + t.B.numel() for t in targets.values()),
    )
    if lora_bias:
        result.extra["lora_bias"] = sorted(lora_bias)
    if missing:
        result.extra["missing_in_tuned"] = missing
    ad = Adapter(fmt, targets, saved, {}, {}, False, str(tuned))
    ad, note = name_part(ad, fmt, component)
    if note:
        warnings.append(note)
    result.warnings = warnings
    result.adapter = ad
    if not writes:  # what writing would refuse is refused here too
        adapter_state(ad, fmt)
    else:
        opts = {"rule": _rule_json(rule), "format": fmt, "include": list(include or []), "exclude": list(exclude or []),
                "save_other": save_other, "svd": svd_method, "fp64": fp64, "seed": seed,
                **({"component": component} if component else {})}
        write_adapter(ad, out, fmt, provenance_meta=provenance("extract", opts, [base, tuned]), force=force)
    return result
