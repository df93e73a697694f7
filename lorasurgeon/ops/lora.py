"""LoRA math on tensors: delta weights and exact merge/unmerge (fp32 accumulate, cast once).

ΔW = w · s · B·A, with s = alpha/r (alpha/√r with rslora). Conv adapters: A (r×in×kh×kw),
B (out×r×1×1): the delta is (B as out×r)·(A as r×in·kh·kw) reshaped to the kernel. A
fan_in_fan_out target (GPT-2 Conv1D, weight stored in×out) gets the transposed delta.
DoRA (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with the norm per output row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorasurgeon.errors import UnsupportedError
from lorasurgeon.io.adapters import LoraTarget
from lorasurgeon.ops.svd import as_matrix


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


def merge_weight(
    W: torch.Tensor, parts: Sequence[tuple[LoraTarget, float]], *, unmerge: bool = False
) -> torch.Tensor:
    """W' = W ± Σ_i w_i s_i B_i A_i computed in fp32 (fp64 for fp64 weights), cast back once.

    A DoRA target must be the only adapter on its module, with weight 1, and cannot be unmerged
    (different bases give the same W'); those cases raise UnsupportedError. ``W`` is not modified.
    """
    acc_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    acc = W.to(acc_dtype, copy=True)
    dora = check_dora(parts, unmerge=unmerge)
    sign = -1.0 if unmerge else 1.0
    for t, w in parts:  # in-place addmm: no second out×in buffer
        b, a = as_matrix(t.B).to(acc_dtype), as_matrix(t.A).to(acc_dtype)
        coef = w * sign * t.scale
        if t.fan_in_fan_out:  # base stored (in, out): add (B·A)ᵀ = Aᵀ·Bᵀ
            acc.addmm_(a.T, b.T, alpha=coef)
        else:
            acc.view(acc.shape[0], -1).addmm_(b, a, alpha=coef)
    if dora:
        t = dora[0]
        mat = acc.reshape(acc.shape[0], -1) if not t.fan_in_fan_out else acc.T
        norm = mat.norm(dim=1, keepdim=True)
        mag = t.magnitude.to(acc_dtype).reshape(-1, 1)
        mat = mat * (mag / norm)
        acc = (mat.T if t.fan_in_fan_out else mat).reshape(acc.shape)
    return acc.to(W.dtype)


def merge_bias(b: torch.Tensor, parts: Sequence[tuple[LoraTarget, float]], *, unmerge: bool = False) -> torch.Tensor:
    """b' = b ± Σ w_i s_i · lora_B_i.bias (PEFT's lora_bias is scaled like the delta)."""
    acc = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32, copy=True)
    for t, w in parts:
        if t.bias is not None:
            acc.add_(t.bias.to(acc.dtype) * (w * t.scale * (-1.0 if unmerge else 1.0)))
    return acc.to(b.dtype)
