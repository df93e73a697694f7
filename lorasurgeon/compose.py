"""``compose``: combine several LoRA adapters into one, by a registered method (ops/compose.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._args import one_or_many
from lorasurgeon._finite import all_finite, result_json_without_adapter
from lorasurgeon._threads import torch_threads
from lorasurgeon.errors import FormatError, InvalidOptionError, UnsupportedError
from lorasurgeon.io.adapters import (
    Adapter,
    LoraTarget,
    adapter_state,
    check_component,
    is_kohya_stem,
    kohya_stems,
    name_part,
    read_adapter,
    refuse_base_changing,
    refuse_lossy_stems,
    rename_targets,
    target_component,
    write_adapter,
)
from lorasurgeon.io.writer import HashedInputs, check_output, provenance
from lorasurgeon.ops import compose as ops
from lorasurgeon.ops import lora
from lorasurgeon.ops.svd import as_matrix, product_rel_diff

ProgressFn = Callable[[int, int, str], None]
FORMATS = ("peft", "kohya", "diffusers")
SCHEMA = "lorasurgeon.compose/1"


@dataclass
class ComposeLayer:
    """One composed target.

    Attributes:
        module: the module name.
        shape: the base weight's shape the delta applies to.
        rank: the output rank.
        sources: how many input adapters target this module.
        rel_error: see ``ops.compose.Composed.rel_error`` (0 for cat; truncation error for svd and
            the recompressing methods; deviation from the weighted sum for peft_linear).
        cast_error: what storing the factors in the output dtype (the inputs' widest, e.g. bf16)
            changed: ``||B'A' − BA||_F / ||BA||_F`` against the factors as computed (fp32/fp64); 0
            when nothing was narrowed.
    """

    module: str
    shape: list[int]
    rank: int
    sources: int
    rel_error: float
    cast_error: float = 0.0


EXACT_TOL = 1e-5  # a relative error below this is rounding (fp32), not truncation


@dataclass
class ComposeResult:
    schema: str
    inputs: list[str]
    output: str | None
    format: str
    method: str
    exact: bool
    weights: list[float]
    rank: int | None
    density: float | None
    seed: int | None
    dry_run: bool
    layers: list[ComposeLayer]
    modules_to_save: list[str]
    averaged: list[str]
    totals: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # the composed adapter itself (not in the JSON): what was written, or the in-memory result
    adapter: Adapter | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return result_json_without_adapter(self)


def _check_options(
    method: ops.ComposeMethod, n: int, weights: Sequence[float] | None, rank: int | None, density: float | None
) -> list[float]:
    if n < 1:
        raise InvalidOptionError("give at least one adapter to compose")
    w = [1.0] * n if not weights else [float(x) for x in weights]
    if len(w) != n:
        raise InvalidOptionError(
            f"{len(w)} --weight value(s) for {n} adapters: give one --weight per adapter, in order, or none (1 each)"
        )
    if not all(math.isfinite(x) and abs(x) <= lora.FP32_MAX for x in w):
        raise InvalidOptionError(f"weights must be finite numbers within float32's range, got {w}")
    if rank is not None:
        if not method.uses_rank:
            raise InvalidOptionError(
                f"--rank does not apply to --method {method.name} (its rank is fixed by the inputs); "
                "use --method svd to recompress the exact sum to a rank"
            )
        if rank < 1:
            raise InvalidOptionError(f"--rank must be at least 1, got {rank}")
    if method.uses_density:
        if density is None:
            raise InvalidOptionError(f"--method {method.name} needs --density D (0 < D <= 1, the fraction of entries kept)")
        if not (0.0 < float(density) <= 1.0):
            raise InvalidOptionError(f"--density must satisfy 0 < D <= 1, got {density}")
    elif density is not None:
        users = [m.name for m in ops.COMPOSE_METHODS.values() if m.uses_density]
        raise InvalidOptionError(f"--density applies only to --method {', '.join(users)}, not {method.name}")
    return w


def _unify_names(adapters: Sequence[Adapter], paths: Sequence[str | Path]) -> list[Adapter]:
    """Name every input's targets alike when kohya stems meet dotted module names.

    A kohya stem (``lora_unet_a_b``, the lossy '.' -> '_' form) takes the module name of another
    input whose kohya stem it is. The union would otherwise hold one layer twice, under two names.

    Raises:
        UnsupportedError: a stem no other input names (its module name needs the base model:
            ``convert --base`` first), or two module names with the same stem.
    """
    plain = {m: i for i, ad in enumerate(adapters) for m in ad.targets if target_component(m) is None}
    for i, ad in enumerate(adapters):
        for m in ad.targets:
            rest = m.partition(".")[2] if target_component(m) and not is_kohya_stem(m) else None
            if rest and rest in plain:
                j = plain[rest]
                raise UnsupportedError(
                    f"{Path(paths[i]).name} names a layer with its pipeline part ({m!r}) and {Path(paths[j]).name} "
                    f"without ({rest!r}): convert one so that both name layers alike (lorasurgeon convert "
                    f"{Path(paths[i]).name} --to peft, or {Path(paths[j]).name} --to diffusers --component "
                    f"{target_component(m)})", paths[i])
    dotted = sorted({m for ad in adapters for m in ad.targets if not is_kohya_stem(m)})
    stemmed = [i for i, ad in enumerate(adapters) if any(is_kohya_stem(m) for m in ad.targets)]
    if not dotted or not stemmed:
        return list(adapters)
    known: dict[str, str] = {}
    for m in dotted:
        for stem in kohya_stems(m):
            if known.setdefault(stem, m) != m:
                raise UnsupportedError(f"modules {known[stem]!r} and {m!r} have the same kohya name {stem!r}; "
                                       "compose them in a layout that keeps module names", paths[0])
    out = list(adapters)
    for i in stemmed:
        ad = adapters[i]
        unknown = sorted(m for m in ad.targets if is_kohya_stem(m) and m not in known)
        if unknown:
            raise UnsupportedError(
                f"kohya name {unknown[0]!r} is a lossy underscored stem that no other input names, and the other "
                "inputs use module paths; map it first: lorasurgeon convert FILE --to peft --base BASE", paths[i])
        renamed = rename_targets(ad, known)
        out[i] = replace(renamed, targets=dict(sorted(renamed.targets.items())))
    return out


def _layer_tasks(
    module: str, present: list[tuple[int, LoraTarget]], weights: Sequence[float], paths: Sequence[str | Path]
) -> list[ops.Task]:
    """Check that every adapter targeting ``module`` agrees on its shapes; the tasks as matrices."""
    i0, t0 = present[0]
    for i, t in present[1:]:
        if t.A.shape[1:] != t0.A.shape[1:] or t.B.shape[0] != t0.B.shape[0] or t.B.shape[2:] != t0.B.shape[2:]:
            raise FormatError(
                f"module {module!r}: delta shape {list(t.delta_shape())} differs from {list(t0.delta_shape())} "
                f"in {Path(paths[i0]).name}; these adapters are for different models", paths[i],
            )
        if t.fan_in_fan_out != t0.fan_in_fan_out:
            raise FormatError(f"module {module!r}: fan_in_fan_out differs from {Path(paths[i0]).name}", paths[i])
    for i, t in present:
        if not abs(float(weights[i]) * float(t.scale)) <= lora.FP32_MAX:  # the fp32 factors would overflow
            raise InvalidOptionError(f"--weight {float(weights[i]):g} times the adapter's scale {float(t.scale):g} for "
                                     f"{module!r} overflows float32", paths[i])
    return [ops.Task(as_matrix(t.B), as_matrix(t.A), float(t.scale), float(weights[i])) for i, t in present]


def _out_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt if dt.is_floating_point else torch.float32


def _compose_bias(present: list[tuple[int, LoraTarget]], weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor | None:
    """LoRA bias (PEFT lora_bias): PEFT adds bias · scale, so at output scale 1 the composed bias is
    Σ w_i s_i bias_i (an adapter without one adds nothing). Never pruned: it is not low-rank."""
    with_bias = [(i, t) for i, t in present if t.bias is not None]
    if not with_bias:
        return None
    acc = torch.zeros(with_bias[0][1].bias.shape, dtype=torch.float64)  # type: ignore[union-attr]
    for i, t in with_bias:
        acc += float(weights[i]) * float(t.scale) * t.bias.double()  # type: ignore[union-attr]
    return acc.to(dtype)


def _compose_saved(
    adapters: Sequence[Adapter], weights: Sequence[float], paths: Sequence[str | Path]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """modules_to_save: the union. A tensor saved by one adapter, or identically by several, is kept
    as is. Different copies of one tensor are full weights (heads, embeddings), not deltas, so a
    weighted SUM would scale them; the one combination that keeps their magnitude is the weighted
    average Σ w_i T_i / Σ w_i (a "model soup"), over the adapters that save it. We take it and report
    the tensor as averaged (PEFT's add_weighted_adapter refuses this case outright).

    Raises:
        InvalidOptionError: the weights of the adapters saving a differing tensor sum to 0.
        UnsupportedError: differing copies of a non-float tensor.
    """
    holders: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, ad in enumerate(adapters):
        for name, t in ad.modules_to_save.items():
            holders.setdefault(name, []).append((i, t))
    saved: dict[str, torch.Tensor] = {}
    averaged: list[str] = []
    for name in sorted(holders):
        copies = holders[name]
        first = copies[0][1]
        if all(c.shape == first.shape and c.dtype == first.dtype and torch.equal(c, first) for _, c in copies[1:]):
            saved[name] = first
            continue
        if any(c.shape != first.shape for _, c in copies):
            raise FormatError(f"modules_to_save tensor {name!r} has different shapes across adapters", paths[copies[1][0]])
        if not all(c.dtype.is_floating_point for _, c in copies):
            raise UnsupportedError(f"modules_to_save tensor {name!r} differs across adapters and is not float; cannot average it",
                                   paths[copies[1][0]])
        wsum = sum(float(weights[i]) for i, _ in copies)
        if wsum == 0:
            raise InvalidOptionError(
                f"modules_to_save tensor {name!r} differs across adapters and is averaged with their weights, "
                "which sum to 0 there; change the weights"
            )
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for i, c in copies:
            acc += float(weights[i]) * c.double()
        saved[name] = (acc / wsum).to(_out_dtype([c for _, c in copies]))
        averaged.append(name)
    return saved, averaged


def compose_adapters(
    inputs: Sequence[str | Path | Adapter] | Adapter, out: str | Path | None, method: str, *, weights: Sequence[float] | None = None,
    rank: int | None = None, density: float | None = None, seed: int | None = None, fmt: str | None = None, fp64: bool = False,
    force: bool = False, dry_run: bool = False, progress: ProgressFn | None = None, component: str | None = None,
) -> ComposeResult:
    """Compose LoRA adapters into one adapter at scale 1 (see ``ops.compose`` for the methods).

    Each input's ranks, alphas, rslora and rank/alpha patterns are folded into the factors through
    each target's own scale; targets are unioned (an adapter that lacks a target contributes nothing
    there). Output targets have scale 1 (non-rslora, alpha = rank, stated per target by
    ``write_adapter``). LoRA biases: Σ w_i s_i bias_i. modules_to_save: see ``_compose_saved``.
    Layers are composed one at a time (dense deltas only for the delta-based methods).

    Args:
        inputs: adapter paths (PEFT folders or files, kohya, diffusers), or ``Adapter`` objects
            you hold (``read_adapter``; then ``out`` must be None), in ``weights`` order.
        out: output path (a folder for PEFT); None composes in memory and writes nothing:
            ``result.adapter`` is the composed ``Adapter`` (``write_adapter`` writes it).
        method: a registered method name (``ops.compose.method_names()``).
        weights: one per input (default 1 each).
        rank: target rank of recompressing methods (default: the largest input rank per layer).
        density: fraction kept by ties / dare_* / magnitude_prune (required there).
        seed: DARE's seed (per layer: sha256 of seed and module name); default 0. Refused by
            methods that draw nothing at random.
        fmt: output layout, peft | kohya | diffusers; None: the inputs' layout when they share one, else peft.
        fp64: compute in fp64.

    Returns:
        The ComposeResult, with the composed adapter as ``.adapter`` (also for ``dry_run``, which
        computes everything and writes nothing).

    Raises:
        InvalidOptionError: unknown method, weight count mismatch, --rank/--density misuse, bad format,
            peft_linear on unequal ranks.
        UnsupportedError: a DoRA input (composing DoRA is ill-posed), kohya stems mixed with module paths.
        FormatError: the adapters disagree on a module's shape.
        OutputExistsError: the output exists and not ``force``.
    """
    given = one_or_many(inputs) or []
    writes = out is not None and not dry_run
    if writes and any(isinstance(x, Adapter) for x in given):
        raise InvalidOptionError("Adapter objects are composed in memory: pass out=None, then write result.adapter "
                                 "with write_adapter")
    # a held Adapter is named in messages by its source file, or by its place in the list
    inputs: list[str | Path] = [(x.source or f"adapter {i + 1}") if isinstance(x, Adapter) else x
                                for i, x in enumerate(given)]
    weights = one_or_many(weights)
    m = ops.get_method(method)
    w = _check_options(m, len(inputs), weights, rank, density)
    if seed is not None and not m.uses_seed:
        uses = ", ".join(n for n, x in ops.COMPOSE_METHODS.items() if x.uses_seed)
        raise InvalidOptionError(f"--seed does not apply to --method {m.name}, which draws nothing at random (it does to {uses})")
    seed = 0 if seed is None else seed
    if fmt is not None and fmt not in FORMATS:
        raise InvalidOptionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt is not None:
        check_component(fmt, component)
    if writes:
        check_output(out, force, inputs, directory=None if fmt is None else fmt == "peft")  # type: ignore[arg-type]
    # Inputs hashed (provenance) on a second thread while they are read and parsed: for
    # adapter-sized inputs the sha256 is done by the time the layers are composed.
    hashes = HashedInputs(inputs) if writes else None
    adapters = [x if isinstance(x, Adapter) else read_adapter(x) for x in given]
    for ad, p in zip(adapters, inputs, strict=True):
        refuse_base_changing(ad, "adapters made with it do not add")
        dora = sorted(n for n, t in ad.targets.items() if t.magnitude is not None)
        if dora:
            raise UnsupportedError(
                f"composing DoRA is ill-posed: its magnitude renormalises W+ΔW per row, so adapters do not add "
                f"(module {dora[0]!r}); merge each into the base model instead", p,
            )
    if fmt is None:  # the inputs' layout when they share one (kohya files stay kohya), else PEFT
        layouts = {ad.format for ad in adapters}
        fmt = layouts.pop() if len(layouts) == 1 else "peft"
        if writes:
            check_output(out, force, inputs, directory=fmt == "peft")  # type: ignore[arg-type]
    adapters = _unify_names(adapters, inputs)
    for ad, p in zip(adapters, inputs, strict=True):
        refuse_lossy_stems(ad, fmt, p)
    modules = sorted({name for ad in adapters for name in ad.targets})
    targets: dict[str, LoraTarget] = {}
    layers: list[ComposeLayer] = []
    emptied: list[str] = []  # layers whose pruned / dropped delta came out zero
    # Factor algebra (cat, svd, peft_linear) is a few small QRs and products per layer: one thread
    # runs it faster than two, which pay a barrier per small op (benchmarks/adapters.py --parts
    # compose: 0.075 s against 0.104-0.111 s). The delta-based methods do dense out x in work that
    # two threads do speed up.
    with torch_threads(torch.get_num_threads() if m.uses_density else 1):
        for li, mod in enumerate(modules):
            if progress:
                progress(li, len(modules), mod)
            present = [(i, ad.targets[mod]) for i, ad in enumerate(adapters) if mod in ad.targets]
            tasks = _layer_tasks(mod, present, w, inputs)
            c = m.fn(tasks, ops.LayerOptions(rank=rank, density=density, seed=seed, module=mod, fp64=fp64))
            t0 = present[0][1]
            dt = _out_dtype([x for _, t in present for x in (t.A, t.B)])
            k = c.rank
            A = c.A.to(dt).reshape(k, *t0.A.shape[1:]).contiguous()
            B = c.B.to(dt).reshape(t0.B.shape[0], k, *t0.B.shape[2:]).contiguous()
            if not (all_finite(A) and all_finite(B)):  # e.g. huge --weight values in a narrow output dtype
                raise InvalidOptionError(f"the composed factors of {mod!r} overflow {str(dt).removeprefix('torch.')}; "
                                         "use smaller --weight values")
            bias = _compose_bias(present, w, dt)
            targets[mod] = LoraTarget(mod, A, B, float(k), 1.0, None, bias, t0.fan_in_fan_out)
            had_delta = any(w[i] != 0 and bool(t.A.any()) and bool(t.B.any()) for i, t in present)
            if m.uses_density and had_delta and not (bool(A.any()) and bool(B.any())):
                emptied.append(mod)  # (inputs that were zero already, e.g. freshly initialised, do not count)
            cast = 0.0 if dt == c.A.dtype else product_rel_diff(B, A, c.B, c.A)
            layers.append(ComposeLayer(mod, list(t0.delta_shape()), k, len(present), round(float(c.rel_error), 8),
                                       round(cast, 8)))
    if progress:
        progress(len(modules), len(modules), "")
    saved, averaged = _compose_saved(adapters, w, inputs)
    warnings: list[str] = []
    if m.name == "peft_linear" and len(adapters) > 1:
        worst = max((x.rel_error for x in layers), default=0.0)
        warnings.append(
            "peft_linear is PEFT's factor-wise 'linear' combination, not the weighted sum: its product adds "
            f"cross terms B_i·A_j (peft#3004); largest relative deviation from the weighted sum {worst:.3g}; "
            "use --method cat or svd for the exact result"
        )
    if m.name in ("ties", "dare_ties") and any(x < 0 for x in w):
        warnings.append(
            f"{m.name} elects each entry's sign on the unweighted deltas (PEFT's rule), so a negative --weight does not "
            f"subtract its adapter in the election; mergekit_{m.name} elects on the weighted deltas"
        )
    if emptied:
        warnings.append(
            f"--density {density:g} keeps nothing of {len(emptied)} layer(s) (e.g. {emptied[0]}): their composed delta "
            "is zero (magnitude pruning keeps int(density × size) entries of each task tensor)"
        )
    if averaged:
        warnings.append(
            f"{len(averaged)} modules_to_save tensor(s) differ across adapters and were averaged with the "
            f"normalised weights: {', '.join(averaged[:5])}{' ...' if len(averaged) > 5 else ''}"
        )
    ranks = [x.rank for x in layers]
    totals = {
        "layers": len(layers),
        "params": sum(t.A.numel() + t.B.numel() for t in targets.values()),
        "input_params": sum(t.A.numel() + t.B.numel() for ad in adapters for t in ad.targets.values()),
        "rank_min": min(ranks, default=0),
        "rank_max": max(ranks, default=0),
        "max_rel_error": max((x.rel_error for x in layers), default=0.0),
        "max_cast_error": max((x.cast_error for x in layers), default=0.0),
    }
    composed = Adapter(fmt, targets, saved, {}, {}, False, None)  # type: ignore[arg-type]
    composed, note = name_part(composed, fmt, component)  # type: ignore[arg-type]
    if note:
        warnings.append(note)
    result = ComposeResult(
        # exact: the written factors equal the weighted sum (svd: only when its rank sufficed for
        # every layer; narrow dtypes: only when the cast changed nothing beyond fp32 rounding)
        SCHEMA, [str(p) for p in inputs], str(out) if writes else None, fmt, m.name,
        m.exact and all(x.rel_error <= EXACT_TOL and x.cast_error <= EXACT_TOL for x in layers), w,
        rank, density if m.uses_density else None, seed if m.uses_seed else None, dry_run, layers,
        sorted(saved), averaged, totals, warnings,
    )
    first_cfg = next((ad.config for ad in adapters if ad.format == "peft" and ad.config), {})
    config = {k: first_cfg.get(k) for k in ("task_type", "base_model_name_or_path") if first_cfg.get(k) is not None}
    composed = replace(composed, config=config)
    result.adapter = composed
    if not writes:  # what writing would refuse (e.g. modules_to_save in a diffusers file) is refused here too
        adapter_state(composed, fmt)
    else:
        opts: dict[str, Any] = {"method": m.name, "weights": w, "rank": rank, "format": fmt, "fp64": fp64,
                                **({"component": component} if component else {})}
        if m.uses_density:
            opts["density"] = density
        if m.uses_seed:
            opts["seed"] = seed
        write_adapter(composed, out, fmt, provenance_meta=provenance("compose", opts, hashes), force=force)  # type: ignore[arg-type]
    return result
