"""Combination methods for LoRA adapters, registered by name (GUIDE §4, "Compose methods").

Every method combines, for ONE layer, the adapters that target it into one low-rank pair
ΔW ≈ B @ A whose scale is 1. A task ``i`` brings its factors B_i (out, r_i), A_i (r_i, in), its
scale s_i (alpha/r, or alpha/sqrt(r) with rslora) and its user weight w_i. Its delta is
τ_i = s_i · B_i @ A_i: the scale is applied exactly once, inside the task tensor (peft#3111 applied
it twice on its SVD path; sd-scripts#868 let merge ratios act squared).

Methods (``COMPOSE_METHODS``; the CLI's ``--method`` choices come from this registry):

- ``cat`` (exact): B = [B_1 … B_n], A = [w_1 s_1 A_1; …; w_n s_n A_n], rank Σ r_i.
- ``svd`` (exact when the rank suffices): the SVD of Σ w_i τ_i computed from the stacked factors
  (QR of both sides and an SVD of the small core, never the out×in matrix), truncated to the rank;
  S goes into B, A keeps orthonormal rows.
- ``ties``, ``dare_ties``, ``dare_linear``, ``magnitude_prune``: act on the dense task deltas τ_i,
  formed one layer at a time, as PEFT's ``add_weighted_adapter(combination_type="<name>_svd")`` and
  ``peft.utils.merge_utils`` do; the merged dense delta is then recompressed by a truncated SVD.
  Where the weights enter mirrors merge_utils exactly: trimming (magnitude pruning) and DARE act on
  the unweighted τ_i (for w_i ≠ 0 top-|x| selection is invariant to the weight anyway), the sign is
  elected on the unweighted trimmed τ_i, and only then are the tensors multiplied by w_i and merged.
  The disjoint mean divides by the NUMBER of tasks agreeing with the elected sign (PEFT), not by the
  sum of their weights (mergekit's ``normalize``, which also elects on the weighted deltas); with
  all weights 1 the two agree. Because the sign is elected before the weights enter, a negative
  weight does not count as subtracting its adapter in the election.
- ``mergekit_ties``, ``mergekit_dare_ties``: mergekit's ``ties`` and ``dare_ties``
  (``merge_methods/generalized_task_arithmetic.py`` with its registry's defaults): trim (or DARE)
  the unweighted τ_i, multiply by w_i, elect per entry the sign of Σ_i w_i·trimmed_i, sum the
  weighted tensors that agree, and for ``mergekit_ties`` (``normalize: true``) divide by the sum of
  the agreeing weights (1 where that is 0); ``mergekit_dare_ties`` (``normalize: false``) keeps the
  sum. A negative weight subtracts its adapter in the election too.
- ``peft_linear`` (for compatibility only, NOT the weighted sum): PEFT's
  ``combination_type="linear"``: A = Σ sgn(w_i s_i) sqrt|w_i s_i| A_i, B = Σ sqrt|w_i s_i| B_i,
  which needs equal ranks and whose product contains the cross terms B_i A_j (i ≠ j): it equals
  Σ w_i τ_i only for a single adapter (peft#3004).

All functions are pure: inputs are never modified; results are new tensors in the compute dtype
(fp32, or fp64 on request or when an input is fp64).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorasurgeon.errors import FormatError, InvalidOptionError
from lorasurgeon.ops import svd


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Task:
    """One adapter's contribution to one layer, as matrices.

    Attributes:
        B: (out, r) up factor (a conv's (out, r, 1, 1) seen as a matrix).
        A: (r, in) down factor (a conv's (r, in, kh, kw) seen as (r, in·kh·kw)).
        scale: the adapter's own scale for this layer (alpha/r or alpha/sqrt(r)).
        weight: the user's weight for this adapter.
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    weight: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def coeff(self) -> float:
        """w_i · s_i: the one factor this task's B_i A_i is multiplied by in a weighted sum."""
        return float(self.weight) * float(self.scale)


@dataclass(frozen=True)
class LayerOptions:
    """Options one method call sees for one layer.

    Attributes:
        rank: target rank R of recompressing methods; None means the largest input rank at this
            layer (PEFT's default ``svd_rank``). Capped at what the layer can hold.
        density: fraction d of entries kept by trimming / DARE (0 < d <= 1).
        seed: the seed of DARE's masks; with ``module`` it seeds this layer's generator.
        module: the layer's module name (part of DARE's per-layer seed).
        fp64: compute in fp64 (otherwise fp32 unless an input is fp64).
    """

    rank: int | None = None
    density: float | None = None
    seed: int = 0
    module: str = ""
    fp64: bool = False


@dataclass(frozen=True)
class Composed:
    """The composed layer: ΔW ≈ B @ A at scale 1.

    Attributes:
        B: (out, k). A: (k, in). In the compute dtype.
        rel_error: for recompressing methods, ||M − B A||_F / ||M||_F where M is the merged delta
            the method defines (the exact weighted sum for ``svd``; the TIES/DARE/pruned merge for
            those: the deviation those methods introduce on purpose is not counted); 0 for ``cat``;
            for ``peft_linear``, the relative deviation of its result from the exact weighted sum.
    """

    B: torch.Tensor
    A: torch.Tensor
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


ComposeFn = Callable[[Sequence[Task], LayerOptions], Composed]


@dataclass(frozen=True)
class ComposeMethod:
    """A registered combination method.

    Attributes:
        name: the ``--method`` name.
        fn: (tasks, options) -> Composed, for one layer.
        exact: the result equals Σ w_i s_i B_i A_i (``cat``; ``svd`` when the rank suffices).
        uses_rank: ``--rank`` applies (the result is recompressed to a rank).
        uses_density: ``--density`` is required.
        uses_seed: ``--seed`` changes the result.
        summary: one line for help texts.
    """

    name: str
    fn: ComposeFn
    exact: bool
    uses_rank: bool
    uses_density: bool
    uses_seed: bool
    summary: str


COMPOSE_METHODS: dict[str, ComposeMethod] = {}


def register_method(
    name: str, *, summary: str, exact: bool = False, uses_rank: bool = True, uses_density: bool = False,
    uses_seed: bool = False,
) -> Callable[[ComposeFn], ComposeFn]:
    """Decorator: register a per-layer combination function under ``name``."""

    def deco(fn: ComposeFn) -> ComposeFn:
        if name in COMPOSE_METHODS:
            raise ValueError(f"compose method {name!r} is already registered")
        COMPOSE_METHODS[name] = ComposeMethod(name, fn, exact, uses_rank, uses_density, uses_seed, summary)
        return fn

    return deco


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(COMPOSE_METHODS)


def get_method(name: str) -> ComposeMethod:
    """The method registered as ``name``.

    Raises:
        InvalidOptionError: no such method; the message lists the choices.
    """
    try:
        return COMPOSE_METHODS[name]
    except KeyError:
        raise InvalidOptionError(f"unknown compose method {name!r}: choose one of {', '.join(method_names())}") from None


# --------------------------------------------------------------------------- helpers
def _dtype(tasks: Sequence[Task], fp64: bool) -> torch.dtype:
    any64 = fp64 or any(t.A.dtype == torch.float64 or t.B.dtype == torch.float64 for t in tasks)
    return torch.float64 if any64 else torch.float32


def _check_tasks(tasks: Sequence[Task]) -> tuple[int, int]:
    """(out, in) shared by every task. Raises FormatError when they differ or do not chain."""
    if not tasks:
        raise FormatError("nothing to compose: no adapter targets this layer")
    out, inn = int(tasks[0].B.shape[0]), int(tasks[0].A.shape[1])
    for i, t in enumerate(tasks):
        if t.B.ndim != 2 or t.A.ndim != 2:
            raise FormatError(f"task {i}: factors must be matrices, got B {tuple(t.B.shape)} and A {tuple(t.A.shape)}")
        if t.B.shape[1] != t.A.shape[0]:
            raise FormatError(f"task {i}: factor shapes do not chain: B {tuple(t.B.shape)}, A {tuple(t.A.shape)}")
        if (int(t.B.shape[0]), int(t.A.shape[1])) != (out, inn):
            raise FormatError(f"task {i}: delta is {int(t.B.shape[0])}x{int(t.A.shape[1])}, others are {out}x{inn}")
    return out, inn


def _check_density(density: float | None) -> float:
    if density is None:
        raise InvalidOptionError("this method needs a density: pass --density D with 0 < D <= 1 (e.g. 0.5)")
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise InvalidOptionError(f"density must satisfy 0 < D <= 1, got {density!r}")
    return d


def target_rank(tasks: Sequence[Task], rank: int | None, limit: int) -> int:
    """The rank a recompressing method keeps: ``rank`` (default: the largest input rank, as
    PEFT's ``svd_rank``), capped at ``limit`` (what the layer can hold), at least 1."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidOptionError(f"rank must be a positive integer, got {rank!r}")
    k = max(t.rank for t in tasks) if rank is None else rank
    return max(1, min(k, limit))


def task_delta(task: Task, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """τ = s · B @ A, the task's dense delta (out, in), WITHOUT its user weight."""
    return float(task.scale) * (task.B.to(dtype) @ task.A.to(dtype))


def recompress(delta: torch.Tensor, k: int) -> Composed:
    """Best rank-k approximation of a dense delta (Eckart–Young), S into B.

    Exact SVD (gesdd) of the (out, in) matrix; ``rel_error`` is sqrt(Σ_{i>k} S_i²)/sqrt(Σ S_i²)
    from all singular values, 0 for a zero delta.
    """
    res = svd.full_svd(delta)
    k = max(1, min(k, res.S.numel()))
    B, A = svd.split_lora(svd.SVDResult(res.U[:, :k], res.S[:k], res.Vh[:k]))
    return Composed(B.contiguous(), A.contiguous(), svd.truncation_error(res.S, k))


# --------------------------------------------------------------------------- sparsification
def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density·numel)`` entries of largest |x| (PEFT's magnitude_based_pruning),
    zero the rest. density >= 1 returns an unchanged copy. Returns a new tensor."""
    d = float(density)
    if d >= 1.0:
        return delta.clone()
    flat = delta.reshape(-1)
    k = int(d * flat.numel())
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2023): keep each entry with probability ``density``, rescale kept ones by
    1/density (PEFT's random_pruning with rescale). The uniform draws are fp64 from ``generator``
    whatever the compute dtype, so the mask depends only on the generator's state. Returns a new
    tensor."""
    d = float(density)
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float64, device=delta.device)
    return torch.where(u < d, delta / d, torch.zeros((), dtype=delta.dtype, device=delta.device))


def dare_generator(seed: int, module: str) -> torch.Generator:
    """A CPU generator for one layer, seeded from (seed, module name) through sha256, so a layer's
    DARE masks depend on the seed and on that layer only (not on which other layers exist)."""
    digest = hashlib.sha256(f"{int(seed)}\0{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES sign election by total mass (PEFT ``majority_sign_method="total"``): per entry, the
    sign of the sum over tasks, +1 where the sum is 0.

    Args:
        trimmed: (n_tasks, ...) stacked task tensors.

    Returns:
        (...) of ±1 in ``trimmed``'s dtype.
    """
    total = trimmed.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(trimmed.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: per entry, the sum of the tasks that agree with the elected sign,
    divided by how many agree (0 where none).

    Args:
        weighted: (n_tasks, ...) weighted task tensors. agree: (n_tasks, ...) bool.
    """
    num = (weighted * agree).sum(dim=0)
    count = agree.sum(dim=0).to(weighted.dtype)
    return num / count.clamp_min(1.0)


def ties_merge(trimmed: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES-Merging's elect + disjoint-merge steps (Yadav et al. 2023) on already trimmed (or DARE'd)
    task tensors, as ``peft.utils.merge_utils.ties``: the sign is elected on the unweighted tensors,
    then each is multiplied by its weight and the agreeing ones are averaged.

    Args:
        trimmed: n tensors of one shape (unweighted). weights: n floats.

    Returns:
        The merged tensor, a new tensor.
    """
    stacked = torch.stack(list(trimmed), dim=0)
    sign = elect_sign(stacked)
    agree = stacked.sign() == sign  # zeros have sign 0: they never agree
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.ndim - 1)))
    return disjoint_mean(weighted, agree)


def mergekit_ties_merge(trimmed: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool) -> torch.Tensor:
    """mergekit's sign consensus and mix (``GTATask.execute`` with ``consensus_method="sum"``):
    the sign is elected on the WEIGHTED tensors (``get_mask``: sign of their sum, +1 at 0), the
    agreeing weighted tensors are summed, and with ``normalize`` divided by the sum of the agreeing
    weights, where that is not 0.

    Args:
        trimmed: n tensors of one shape (unweighted, already trimmed or DARE'd). weights: n floats.

    Returns:
        The merged tensor, a new tensor.
    """
    stacked = torch.stack(list(trimmed), dim=0)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.ndim - 1)))
    weighted = stacked * w
    agree = weighted.sign() == elect_sign(weighted)  # zeros have sign 0: they never agree
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def ties_dense(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Full TIES on dense task deltas: trim each to its top-``density`` fraction by |x|, then
    :func:`ties_merge` (elect on the unweighted trimmed tensors, weighted disjoint mean)."""
    d = _check_density(density)
    return ties_merge([magnitude_prune(t, d) for t in deltas], weights)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i t_i, a new tensor."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out = out + float(w) * t
    return out


# --------------------------------------------------------------------------- methods
@register_method("cat", exact=True, uses_rank=False,
                 summary="exact: concatenate the factors (rank = sum of the input ranks)")
def compose_cat(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """B = [B_1 … B_n] (out, Σr_i), A = [w_1 s_1 A_1; …; w_n s_n A_n] (Σr_i, in): B A = Σ w_i τ_i."""
    _check_tasks(tasks)
    B, A = svd.stack_factors([(t.B, t.A, t.coeff) for t in tasks], fp64=opts.fp64)
    return Composed(B, A, 0.0)


@register_method("svd", exact=True,
                 summary="exact weighted sum recompressed to --rank by factor algebra (default: largest input rank)")
def compose_svd(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """Truncated SVD of Σ w_i s_i B_i A_i from the stacked factors (``svd.stack_factors`` then
    ``svd.product_svd``): O((out+in)·(Σr)²), never the out×in matrix. Keeps k = min(rank, the
    number of components, at most min(out, in, Σr_i)); exact when k reaches that number.
    ``rel_error`` = sqrt(dropped energy)/sqrt(total energy) of the weighted sum."""
    out, inn = _check_tasks(tasks)
    Bc, Ac = svd.stack_factors([(t.B, t.A, t.coeff) for t in tasks], fp64=opts.fp64)
    psvd = svd.product_svd(Bc, Ac, fp64=opts.fp64)
    k = min(target_rank(tasks, opts.rank, min(out, inn)), psvd.S.numel())
    B, A = svd.split_lora(psvd.truncate(k))  # only the kept k vectors are projected back
    return Composed(B.contiguous(), A.contiguous(), svd.truncation_error(psvd.S, k))


def _dense_merge(tasks: Sequence[Task], opts: LayerOptions, *, sparsify: str, merge: str) -> Composed:
    out, inn = _check_tasks(tasks)
    d = _check_density(opts.density)
    dt = _dtype(tasks, opts.fp64)
    gen = dare_generator(opts.seed, opts.module) if sparsify == "dare" else None
    parts = []
    for t in tasks:  # one dense (out, in) task delta at a time, in input order (DARE's draw order)
        tau = task_delta(t, dt)
        parts.append(magnitude_prune(tau, d) if sparsify == "magnitude" else dare(tau, d, gen))  # type: ignore[arg-type]
        del tau
    weights = [t.weight for t in tasks]
    if merge == "ties":
        merged = ties_merge(parts, weights)
    elif merge in ("mergekit_ties", "mergekit_ties_sum"):
        merged = mergekit_ties_merge(parts, weights, normalize=merge == "mergekit_ties")
    else:
        merged = weighted_sum(parts, weights)
    del parts
    return recompress(merged, target_rank(tasks, opts.rank, min(out, inn)))


@register_method("ties", uses_density=True,
                 summary="TIES on the deltas: trim to --density, elect sign by mass, disjoint mean; then SVD to --rank")
def compose_ties(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """TIES (PEFT ``ties_svd``): trim each τ_i to its top-d fraction by |x|, elect per entry the sign
    of Σ_i trimmed_i, average w_i·trimmed_i over the tasks that agree (0 where none), recompress."""
    return _dense_merge(tasks, opts, sparsify="magnitude", merge="ties")


@register_method("dare_ties", uses_density=True, uses_seed=True,
                 summary="DARE (keep with prob. --density, rescale 1/d, seeded) then TIES election and disjoint mean")
def compose_dare_ties(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """DARE-TIES (PEFT ``dare_ties_svd``): DARE each τ_i (seeded per layer), then TIES's sign election
    and disjoint mean of the weighted tensors, recompress."""
    return _dense_merge(tasks, opts, sparsify="dare", merge="ties")


@register_method("dare_linear", uses_density=True, uses_seed=True,
                 summary="DARE (keep with prob. --density, rescale 1/d, seeded) then the weighted sum")
def compose_dare_linear(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """DARE-linear (PEFT ``dare_linear_svd``): Σ w_i DARE(τ_i), recompress."""
    return _dense_merge(tasks, opts, sparsify="dare", merge="linear")


@register_method("magnitude_prune", uses_density=True,
                 summary="keep each delta's top --density fraction by |x|, then the weighted sum")
def compose_magnitude_prune(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """Magnitude pruning (PEFT ``magnitude_prune_svd``): Σ w_i prune(τ_i, d), recompress."""
    return _dense_merge(tasks, opts, sparsify="magnitude", merge="linear")


@register_method("mergekit_ties", uses_density=True,
                 summary="mergekit's ties: trim to --density, elect sign on the weighted deltas, sum the agreeing ones "
                         "over the sum of their weights; then SVD to --rank")
def compose_mergekit_ties(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """mergekit ``ties`` (normalize on): trim each τ_i to its top-d fraction by |x|, then
    :func:`mergekit_ties_merge` with ``normalize``, recompress."""
    return _dense_merge(tasks, opts, sparsify="magnitude", merge="mergekit_ties")


@register_method("mergekit_dare_ties", uses_density=True, uses_seed=True,
                 summary="mergekit's dare_ties: DARE (seeded), elect sign on the weighted deltas, sum the agreeing ones")
def compose_mergekit_dare_ties(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """mergekit ``dare_ties`` (rescale on, normalize off): DARE each τ_i, then
    :func:`mergekit_ties_merge` without ``normalize``, recompress."""
    return _dense_merge(tasks, opts, sparsify="dare", merge="mergekit_ties_sum")


@register_method("peft_linear", uses_rank=False,
                 summary="PEFT's factor-wise 'linear' (NOT the weighted sum: adds cross terms B_i A_j); equal ranks")
def compose_peft_linear(tasks: Sequence[Task], opts: LayerOptions) -> Composed:
    """PEFT's ``combination_type="linear"`` (LoraModel._generalized_task_arithmetic_weighted_adapter):
    with c_i = w_i s_i, A = Σ sgn(c_i) sqrt|c_i| A_i and B = Σ sqrt|c_i| B_i, at scale 1.

    B A = Σ_i c_i B_i A_i + Σ_{i≠j} ... cross terms, so it is the weighted sum only for one adapter
    (peft#3004). ``rel_error`` reports ||B A − Σ c_i B_i A_i||_F / ||Σ c_i B_i A_i||_F, computed on
    factors ([B, B_1 … B_n]·[A; −c_1 A_1; …]) without the dense matrix.

    Raises:
        InvalidOptionError: the tasks' ranks differ (the factors cannot be added).
    """
    _check_tasks(tasks)
    ranks = sorted({t.rank for t in tasks})
    if len(ranks) > 1:
        raise InvalidOptionError(
            f"peft_linear adds the factors, so every adapter needs the same rank at a layer; got ranks "
            f"{', '.join(map(str, ranks))}; use --method cat or svd (exact)"
        )
    dt = _dtype(tasks, opts.fp64)
    A = torch.zeros(tasks[0].A.shape, dtype=dt)
    B = torch.zeros(tasks[0].B.shape, dtype=dt)
    for t in tasks:
        c = t.coeff
        root = math.sqrt(abs(c))
        A = A + (root if c >= 0 else -root) * t.A.to(dt)  # the sign on one side only, as PEFT
        B = B + root * t.B.to(dt)
    exact_B, exact_A = svd.stack_factors([(t.B, t.A, t.coeff) for t in tasks], fp64=dt == torch.float64)
    ref = svd.lowrank_frobenius_norm(exact_B, exact_A)
    diff = svd.lowrank_frobenius_norm(torch.cat([B, exact_B.to(dt)], dim=1), torch.cat([A, -exact_A.to(dt)], dim=0))
    rel = diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
    return Composed(B, A, rel)
