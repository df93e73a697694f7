"""LoRA math on tensors: delta weights and exact merge/unmerge (fp32 accumulate, cast once).

ΔW = w · s · B·A, with s = alpha/r (alpha/√r with rslora). Conv adapters: A (r×in×kh×kw),
B (out×r×1×1): the delta is (B as out×r)·(A as r×in·kh·kw) reshaped to the kernel. A
fan_in_fan_out target (GPT-2 Conv1D, weight stored in×out) gets the transposed delta.
DoRA (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with the norm per output row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorasurgeon.errors import FormatError, UnsupportedError
from lorasurgeon.io.adapters import LoraTarget
from lorasurgeon.ops.svd import as_matrix

FP32_MAX = float(torch.finfo(torch.float32).max)  # the math is fp32: a larger --weight overflows it


def delta_weight(t: LoraTarget, weight: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w · s · B·A in ``dtype``, shaped like the base weight it applies to."""
    d = as_matrix(t.B).to(dtype) @ as_matrix(t.A).to(dtype)
    d.mul_(weight * t.scale)
    if t.fan_in_fan_out:
        d = d.T
    return d.reshape(t.delta_shape())


def check_dora(parts: Sequence[tuple[LoraTarget, float]], *, unmerge: bool) -> list[LoraTarget]:
    """The DoRA targets among ``parts``, after refusing the ill-posed cases: unmerging DoRA,
    weighting it, or combining it with another adapter on the same module.

    Raises:
        UnsupportedError: one of those cases.
    """
    dora = [t for t, _ in parts if t.magnitude is not None]
    if dora:
        t = dora[0]
        if unmerge:
            raise UnsupportedError(f"module {t.module!r}: unmerging DoRA is ill-posed (the base is not recoverable)")
        if len(parts) > 1:
            raise UnsupportedError(f"module {t.module!r}: a DoRA adapter cannot be combined with other adapters on the same module")
        if parts[0][1] != 1.0:
            raise UnsupportedError(f"module {t.module!r}: weighting a DoRA adapter is ill-posed; merge it with weight 1")
    return dora


def check_init(parts: Sequence[tuple[LoraTarget, float]], *, unmerge: bool) -> list[LoraTarget]:
    """The targets among ``parts`` made with a base-changing initialisation (``LoraTarget.init``),
    after refusing what cannot be merged as peft would: an initialisation a merge cannot
    recompute, unmerging or weighting such an adapter, two of them on one module, a conv or DoRA
    one, and OLoRA on a fan_in_fan_out weight (peft cannot make that either).

    Raises:
        UnsupportedError: one of those cases.
    """
    # A merge can recompute PiSSA's full SVD and OLoRA's QR from the base weight alone, as peft
    # does when it loads the adapter; the others (PiSSA's randomized "pissa_niter_N", CorDA,
    # LoRA-GA, LoftQ) depend on a random state, data or quantization.
    inits = [(t, w) for t, w in parts if t.init]
    for t, w in inits:
        m = f"module {t.module!r} was initialised with init_lora_weights={t.init!r}, which changes the base weight"
        if t.init != "pissa" and t.init.lower() != "olora":  # (peft's own tests: "pissa" exactly, "olora" any case)
            raise UnsupportedError(f"{m} in a way a merge cannot recompute (only 'pissa' and 'olora' are); save it "
                                   "with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA")
        if unmerge:
            raise UnsupportedError(f"{m}: unmerging it is ill-posed (the base is not recoverable)")
        if w != 1.0:
            raise UnsupportedError(f"{m}: weighting it is ill-posed; merge it with weight 1")
        if t.is_conv or t.magnitude is not None:
            raise UnsupportedError(f"{m}: only Linear, non-DoRA targets of such adapters are supported")
        if t.init.lower() == "olora" and t.fan_in_fan_out:
            raise UnsupportedError(f"{m}: OLoRA on a fan_in_fan_out (Conv1D) weight is not supported")
    if len(inits) > 1:
        raise UnsupportedError(f"module {inits[0][0].module!r}: two adapters whose initialisations change the base "
                               "weight cannot be merged together (each would start from the base the other left)")
    return [t for t, _ in inits]


def init_correction(W: torch.Tensor, t: LoraTarget) -> LoraTarget:
    """What a base-changing initialisation took out of the base weight ``W``, as a rank-r target
    (scale 1 or s) whose delta is minus that amount: PiSSA, the best rank-r approximation of W
    (W = U S Vᵀ, the r largest singular values); OLoRA, s·Q_r·R_r from W = QR. Merging it with the
    adapter gives what peft gives when it loads the adapter on ``W`` (which runs the
    initialisation again) and merges. Computed in fp32 as peft does (fp64 for fp64 weights): a
    full fp64 SVD takes several times as long, and every layer of such an adapter needs one."""
    Wf = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    r = t.rank
    if t.init is not None and t.init.lower() == "olora":
        Q, R = torch.linalg.qr(Wf)
        return LoraTarget(t.module, R[:r].contiguous(), (-Q[:, :r]).contiguous(), float(r), t.scale)
    M = Wf.T if t.fan_in_fan_out else Wf  # PiSSA factorizes the (out, in) matrix
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return LoraTarget(t.module, Vh[:r].contiguous(), (-U[:, :r] * S[:r]).contiguous(), float(r), 1.0,
                      fan_in_fan_out=t.fan_in_fan_out)


@dataclass(frozen=True)
class MergeStats:
    """Norms gathered while merging one weight: per-block norms in the accumulation dtype, summed in fp64."""

    update_norm: float  # ||ΔW||_F of the update in the accumulation dtype, before the cast back
    base_norm: float  # ||W||_F


# Elements per block of the streamed merge: about 8 MB of fp32 (256 rows of a 8192-wide weight).
# Measured on a 4096x8192 fp16 weight: a whole-matrix .float() cost 74-101 ms CPU (fresh pages
# fault in), the same conversion in 256-row blocks into a reused buffer 6-9 ms. L2-sized blocks
# (512 KB) were tried and are slower here (benchmarks/merge_block.py; docs/benchmarks.md, merge).
_BLOCK_ELEMS = 1 << 21
# Fewer rows than this take a different BLAS path (gemv-like) whose rounding differs by an ulp
# from the whole-matrix product; at least this many rows per block keeps the blocks' results
# equal to the whole-matrix computation for every row count measured (4 and up did).
_MIN_BLOCK_ROWS = 8


def merge_weight(
    W: torch.Tensor,
    parts: Sequence[tuple[LoraTarget, float]],
    *,
    unmerge: bool = False,
    name: str | None = None,
) -> torch.Tensor:
    """W' = W ± Σ_i w_i s_i B_i A_i computed in fp32 (fp64 for fp64 weights), cast back once.

    A DoRA target must be the only adapter on its module, with weight 1, and cannot be unmerged
    (different bases give the same W'); those cases raise UnsupportedError. ``W`` is not modified.
    """
    return merge_weight_stats(W, parts, unmerge=unmerge, name=name)[0]


def merge_weight_stats(
    W: torch.Tensor,
    parts: Sequence[tuple[LoraTarget, float]],
    *,
    unmerge: bool = False,
    name: str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MergeStats]:
    """``merge_weight`` in row blocks, with ||ΔW|| and ||W|| and a finiteness check of W.

    Each block of rows is converted once into a reused fp32 (fp64) buffer, checked (a finite
    norm proves every entry finite; the exact check runs only when it is not), updated by
    ``addmm_`` with the matching rows of B (or of Aᵀ for fan_in_fan_out weights) and converted
    once into the output. Nothing of W's full size is allocated but the output, and every output
    element is the same dot product as in the whole-matrix computation.

    ``update_norm`` is the norm of the update in the accumulation dtype, before the cast back:
    for plain LoRA ||Σ ±w_i s_i B_i A_i||_F, computed exactly from the factors (fp64 Gram
    matrices, no dense pass); for DoRA, blockwise from the merged rows.

    ``out``: optional contiguous tensor of W's shape and dtype that receives W' (a caller's reused
    buffer); it must not overlap W.

    Raises:
        FormatError: W holds NaN or Inf (named by ``name``).
        UnsupportedError: the DoRA cases of ``check_dora``.
    """
    acc_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    dora = check_dora(parts, unmerge=unmerge)
    if check_init(parts, unmerge=unmerge):
        parts = [*parts, *((init_correction(W, t), 1.0) for t, _ in parts if t.init)]
    sign = -1.0 if unmerge else 1.0
    if out is None:
        out = torch.empty_like(W, memory_format=torch.contiguous_format)
    elif out.shape != W.shape or out.dtype != W.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {W.dtype} tensor of shape {tuple(W.shape)}")
    src = W.reshape(W.shape[0], -1)
    dst = out.view(W.shape[0], -1)
    rows, cols = src.shape
    # Row factors: the output rows of the (stored) matrix come from B's rows, or from Aᵀ's rows
    # for a fan_in_fan_out weight stored (in, out).
    factors = []
    for t, w in parts:
        b, a = as_matrix(t.B).to(acc_dtype), as_matrix(t.A).to(acc_dtype)
        factors.append((a.T, b.T, w * sign * t.scale) if t.fan_in_fan_out else (b, a, w * sign * t.scale))
    mag = None
    if dora:
        t = dora[0]
        if t.fan_in_fan_out:  # the norm runs down the stored columns: not row-separable
            return _merge_whole(W, factors, t, acc_dtype)
        mag = t.magnitude.to(acc_dtype).reshape(-1, 1)
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMS // max(1, cols))
    # A last block shorter than _MIN_BLOCK_ROWS joins the one before it.
    buf = torch.empty(min(rows, step + _MIN_BLOCK_ROWS - 1), cols, dtype=acc_dtype)
    orig = torch.empty_like(buf) if mag is not None else None
    upd2 = 0.0
    base2 = 0.0
    i = 0
    while i < rows:
        j = rows if rows - i < step + _MIN_BLOCK_ROWS else i + step
        blk = buf[: j - i]
        blk.copy_(src[i:j])
        nrm = float(torch.linalg.vector_norm(blk))  # a finite norm proves every entry finite
        if not math.isfinite(nrm) and not bool(torch.isfinite(blk).all()):
            raise FormatError(f"base weight {name!r} holds NaN or Inf values; merging into it is meaningless")
        base2 += nrm**2
        if orig is not None:
            orig[: j - i].copy_(blk)
        for lhs, rhs, coef in factors:
            blk.addmm_(lhs[i:j], rhs, alpha=coef)
        if mag is not None:
            blk.mul_(mag[i:j] / blk.norm(dim=1, keepdim=True))
            upd2 += float(torch.linalg.vector_norm(orig[: j - i].sub_(blk))) ** 2
        dst[i:j].copy_(blk)
        i = j
    if mag is None:
        upd2 = _stacked_norm2(factors)
    return out, MergeStats(upd2**0.5, base2**0.5)


def _stacked_norm2(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """||Σ c_i L_i R_i||_F² from the factors: sum((LᵀL) ∘ (R Rᵀ)) of the stacked [L_i], [c_i R_i], in fp64."""
    lhs = torch.cat([f[0].double() for f in factors], dim=1)
    rhs = torch.cat([f[1].double() * f[2] for f in factors], dim=0)
    return float(((lhs.T @ lhs) * (rhs @ rhs.T)).sum().clamp_min(0))


def _merge_whole(
    W: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor, float]], t: LoraTarget, acc_dtype: torch.dtype
) -> tuple[torch.Tensor, MergeStats]:
    """DoRA on a fan_in_fan_out weight: the whole matrix at once (norms run down its columns)."""
    acc = W.to(acc_dtype, copy=True)
    base = float(torch.linalg.vector_norm(acc, dtype=torch.float64))
    if not math.isfinite(base):
        raise FormatError(f"base weight {t.module!r} holds NaN or Inf values; merging into it is meaningless")
    for lhs, rhs, coef in factors:
        acc.addmm_(lhs, rhs, alpha=coef)
    mat = acc.T
    mat.mul_(t.magnitude.to(acc_dtype).reshape(-1, 1) / mat.norm(dim=1, keepdim=True))
    out = acc.to(W.dtype)
    upd = float(torch.linalg.vector_norm(out.to(acc_dtype) - W.to(acc_dtype), dtype=torch.float64))
    return out, MergeStats(upd, base)


def merge_bias(b: torch.Tensor, parts: Sequence[tuple[LoraTarget, float]], *, unmerge: bool = False) -> torch.Tensor:
    """b' = b ± Σ w_i s_i · lora_B_i.bias (PEFT's lora_bias is scaled like the delta)."""
    acc = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32, copy=True)
    for t, w in parts:
        if t.bias is not None:
            acc.add_(t.bias.to(acc.dtype) * (w * t.scale * (-1.0 if unmerge else 1.0)))
    return acc.to(b.dtype)
