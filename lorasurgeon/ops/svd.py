"""SVD engine: singular values, truncated SVD, and exact algebra on low-rank factors.

All math runs in fp32 (or fp64 on request) whatever the input dtype; inputs are never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasurgeon.errors import FormatError


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a weight as a matrix: Linear (out, in) as is; Conv (out, in, kh, kw) as (out, in*kh*kw)."""
    if w.ndim == 2:
        return w
    if w.ndim >= 3:
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"expected a 2-D or higher weight, got shape {tuple(w.shape)}")


def _compute_dtype(w: torch.Tensor, fp64: bool) -> torch.dtype:
    return torch.float64 if (fp64 or w.dtype == torch.float64) else torch.float32


def _check_finite(m: torch.Tensor, name: str | None) -> None:
    if not torch.isfinite(m).all():
        raise FormatError(f"weight {name or ''} holds NaN or Inf values; cannot factorize it".replace("  ", " "))


def singular_values(w: torch.Tensor, *, fp64: bool = False, name: str | None = None) -> torch.Tensor:
    """All min(m, n) singular values of ``as_matrix(w)``, descending, in fp32 (fp64 on request).

    Falls back to fp64 when the LAPACK driver does not converge in fp32.
    """
    m = as_matrix(w).to(_compute_dtype(w, fp64))
    _check_finite(m, name)
    try:
        return torch.linalg.svdvals(m)
    except RuntimeError:  # non-convergence: retry in fp64
        return torch.linalg.svdvals(m.to(torch.float64)).to(m.dtype)


@dataclass(frozen=True)
class SVDResult:
    """A truncated SVD W ≈ U diag(S) Vh with U (m×k), S (k,), Vh (k×n), in the compute dtype."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def full_svd(w: torch.Tensor, *, fp64: bool = False, name: str | None = None) -> SVDResult:
    """Thin exact SVD (gesdd), retried in fp64 on non-convergence."""
    m = as_matrix(w).to(_compute_dtype(w, fp64))
    _check_finite(m, name)
    try:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    except RuntimeError:
        U, S, Vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
        U, S, Vh = U.to(m.dtype), S.to(m.dtype), Vh.to(m.dtype)
    return SVDResult(U, S, Vh)


def energy_curve(S: torch.Tensor) -> torch.Tensor:
    """Fraction of squared Frobenius energy kept by the first k values, k = 1..n."""
    e = S.double() ** 2
    total = e.sum()
    if total <= 0:
        return torch.ones_like(e)
    return torch.cumsum(e, 0) / total


def rank_for_energy(S: torch.Tensor, t: float) -> int:
    """Smallest k with sum_{i<=k} S_i^2 >= t * sum S_i^2 (at least 1)."""
    curve = energy_curve(S)
    k = int(torch.searchsorted(curve, torch.tensor(t, dtype=curve.dtype) - 1e-12).item()) + 1
    return max(1, min(k, S.numel()))


def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli (2007) effective rank: exp of the entropy of S / sum(S)."""
    s = S.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()).item())


def break_even_rank(m: int, n: int) -> float:
    """Rank below which U (m×k) + V (k×n) holds fewer parameters than W (m×n)."""
    return m * n / (m + n)


def lowrank_frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F without forming the product: sqrt(sum((BᵀB) ∘ (AAᵀ))).

    Args:
        B: (out, r) or (out, r, 1, 1).
        A: (r, in) or (r, in, kh, kw).
    """
    b = as_matrix(B).double()
    a = as_matrix(A).double()
    val = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)
    return float(val.sqrt().item())
