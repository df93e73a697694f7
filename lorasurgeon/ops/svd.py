"""SVD engine: singular values, truncated SVD, and exact algebra on low-rank factors.

All math runs in fp32 (or fp64 on request) whatever the input dtype; inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorasurgeon._finite import all_finite
from lorasurgeon.errors import FormatError, InvalidOptionError


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
    if not all_finite(m):
        raise FormatError(f"weight {name or ''} holds NaN or Inf values; cannot factorize it".replace("  ", " "))


def singular_values(w: torch.Tensor, *, fp64: bool = False, name: str | None = None) -> torch.Tensor:
    """All min(m, n) singular values of ``as_matrix(w)``, descending, in fp32 (fp64 on request).

    Falls back to fp64 when the LAPACK driver does not converge in fp32. A wide matrix is
    decomposed as its transpose (same values): LAPACK's path for m < n is 2.7x slower on CPU
    (2048×4096: 3.1 s against 1.2 s), as ``_gesdd`` knows too.
    """
    m = as_matrix(w).to(_compute_dtype(w, fp64))
    _check_finite(m, name)
    if m.shape[0] < m.shape[1]:
        m = m.T
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


def _gesdd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a matrix already in its compute dtype; fp64 retry on non-convergence.

    ``torch.linalg.svd`` runs LAPACK's divide-and-conquer gesdd on CPU. We never call gesvd:
    it measured 5-10x slower here and did not finish 4096x4096 in 14 minutes (GUIDE §6).
    """
    if m.shape[0] < m.shape[1]:
        # Wide: factor the tall transpose, m = (mᵀ)ᵀ = (U S Vh)ᵀ = Vhᵀ S Uᵀ. MKL's gesdd took
        # 1.5-1.9x the CPU time on the wide layout (384x1536, 1024x2752, 2048x4096; 1 and 2
        # threads); the randomized route's projected matrix (q, short side) is always wide.
        U, S, Vh = _gesdd(m.T)
        return Vh.T.contiguous(), S, U.T.contiguous()
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except RuntimeError:  # non-convergence (ill-conditioned fp32): retry in fp64
        U, S, Vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
        return U.to(m.dtype), S.to(m.dtype), Vh.to(m.dtype)


def full_svd(w: torch.Tensor, *, fp64: bool = False, name: str | None = None) -> SVDResult:
    """Thin exact SVD (gesdd), retried in fp64 on non-convergence.

    Args:
        w: (m, n) or (out, in, kh, kw), any float dtype; not modified.

    Returns:
        U (m, p), S (p,), Vh (p, n) with p = min(m, n), in the compute dtype.
    """
    m = as_matrix(w).to(_compute_dtype(w, fp64))
    _check_finite(m, name)
    return SVDResult(*_gesdd(m))


def energy_curve(S: torch.Tensor) -> torch.Tensor:
    """Fraction of squared Frobenius energy kept by the first k values, k = 1..n."""
    e = S.double() ** 2
    total = e.sum()
    if total <= 0:
        return torch.ones_like(e)
    return (torch.cumsum(e, 0) / total).clamp_(max=1.0)  # the cumsum's rounding can pass 1 by an ulp


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


# ---------------------------------------------------------------------------
# Truncated SVD: exact, randomized, auto
# ---------------------------------------------------------------------------

SVD_METHODS = ("auto", "exact", "randomized")


def _check_rank(k: int, m: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidOptionError(f"rank must be an integer, got {k!r}")
    if not 1 <= k <= min(m, n):
        raise InvalidOptionError(f"rank {k} is out of range for a {m}x{n} matrix: choose 1..{min(m, n)}")
    return k


def default_oversample(k: int) -> int:
    """Default oversampling p of the randomized SVD: the sketch has q = k + p = 2k columns (q >= k + 10).

    Chosen by measurement (fp32, 2 QR-orthonormalised power iterations, this module's range
    finder; "excess" = relative Frobenius error over the exact truncation's, the max over
    seeds and layers; target: every layer within 1%):

    ===============================================  ======  ======  ======  ======
    p (oversample)                                   10      k/2     3k/4    k
    ===============================================  ======  ======  ======  ======
    synthetic S_i ∝ i^-0.5, 1536x384, k=96, 5 seeds  1.71%   0.60%   0.31%   0.18%
    synthetic S_i ∝ i^-0.5, 4096x4096, k=64          0.47%   0.21%   --      0.06%
    synthetic S_i ∝ i^-0.5, 4096x11008, k=1024       2.28%   0.53%   0.29%   0.16%
    all-MiniLM-L6-v2, 37 linears, k = 25% of min     2.88%   1.06%   0.65%   0.38%
    all-MiniLM-L6-v2, 37 linears, k = 12.5% of min   1.94%   1.19%   0.93%   0.60%
    CPU seconds, 4096x11008, k=1024, 1 thread        14.2    19.3    24.8    31.6
    ===============================================  ======  ======  ======  ======

    k/2 misses 1% on real layers; 3k/4 meets it but only just (0.93% on MiniLM's pooler at
    12.5% rank, 5 seeds), so the default is p = k, q = 2k: 28% more work than 3k/4 for a
    margin that holds (worst real layer 0.60%); the issue also reported q = 2k under 0.4%.
    Flatter spectra are harder (S_i ∝ i^-0.1, 1536x384, k=96: q = 2k is 1.13% over, k/2
    1.69%); pass a larger ``oversample`` or ``power_iters``, or use the exact method, there.
    """
    return max(10, k)


def _gram_svd(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-k SVD through the eigendecomposition of the smaller Gram matrix, in fp64.

    Tall W (m >= n): WᵀW = V S² Vᵀ, U = W V / S. Wide W: W Wᵀ = U S² Uᵀ, Vh = Uᵀ W / S.
    The Gram matrix and the back-projection run in fp64 over blocks of W, so the extra memory
    is the (p, p) Gram matrix and its eigenvectors (p = min(m, n)) plus one fp64 block, not an
    fp64 copy of W.

    Args:
        m: (rows, cols) in its compute dtype. k: rank kept.

    Returns:
        U (rows, k), S (k,), Vh (k, cols) in ``m``'s dtype, or None when sigma_k is too small
        for the squared condition number (the caller then uses gesdd).
    """
    f64 = torch.float64
    wide = m.shape[0] < m.shape[1]
    a = m.T if wide else m  # (long, p): the Gram matrix is aᵀa
    step = max(1, (1 << 22) // a.shape[1])  # rows of a per block: about 32 MB in fp64
    gram = torch.zeros(a.shape[1], a.shape[1], dtype=f64, device=a.device)
    for i in range(0, a.shape[0], step):
        blk = a[i : i + step].to(f64)
        gram.addmm_(blk.T, blk)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    lam = evals[-k:].flip(0)
    lam_max = evals[-1]
    # eigh's absolute error is about eps64 * lam_max; sigma_k² must sit far above it.
    if lam_max <= 0 or lam[-1] <= _GRAM_MIN_RATIO**2 * lam_max:
        return None
    S = lam.sqrt()
    V = evecs[:, -k:].flip(1)  # (p, k) right singular vectors of a
    Ua = torch.empty(a.shape[0], k, dtype=m.dtype, device=a.device)
    for i in range(0, a.shape[0], step):
        Ua[i : i + step] = ((a[i : i + step].to(f64) @ V) / S).to(m.dtype)
    V, S = V.to(m.dtype), S.to(m.dtype)
    if wide:  # a = mᵀ = Ua S Vᵀ  =>  m = V S Uaᵀ
        return V.contiguous(), S, Ua.T.contiguous()
    return Ua, S, V.T.contiguous()


# Smallest sigma_k / sigma_1 the fp64 Gram route accepts. The Gram matrix squares the condition
# number: U = W V / S loses orthonormality as eps64 * (sigma_1 / sigma_k)². Measured on a
# 1200x400 fp32 matrix with S log-spaced 1..1e-9, truncated where sigma_k / sigma_1 reaches
# 1e-4 / 1e-5 / 1e-6 / 1e-7: U orthonormal to 8e-9 / 1.5e-7 / 1.4e-5 / 4.8e-2 (gesdd32: 2.2e-6
# throughout), reconstruction within 5e-8 of the fp64 best rank-k (gesdd32: 1e-6..5e-6).
# Down to 1e-5 the Gram route is at least as good as gesdd32 on every count; below, gesdd runs.
_GRAM_MIN_RATIO = 1e-5


def _use_gram(m: torch.Tensor) -> bool:
    """Whether exact mode takes the fp64 Gram route instead of gesdd.

    Measured (2-core CPU shared with other jobs, wall time, min of 1-7 runs; S_i ∝ i^-0.5;
    "recon" = ||U S Vh (Gram) - U S Vh (gesdd)||_F / ||W||_F at the same k):

    ======================  =========  ============  ============  ===================
    shape, k                gesdd32    Gram fp64     Gram fp32     recon fp64 / fp32
    ======================  =========  ============  ============  ===================
    384x384, 96             37 ms      36 ms         22 ms         1.9e-6 / 2.3e-6
    768x768, 192            186 ms     251 ms        112 ms        1.8e-6 / 3.3e-5
    1536x1536, 384          2.08 s     2.87 s        1.09 s        2.4e-6 / 4.1e-4
    4096x4096, 1024         130 s      134 s         60 s          3.3e-6 / 1.5e-3
    768x1152, 192           333 ms     228 ms        90 ms         2.2e-6 / 3.6e-6
    1152x768, 192           187 ms     147 ms        72 ms         2.5e-6 / 1.0e-4
    1536x384, 96            86 ms      50 ms         25 ms         2.0e-6 / 4.0e-6
    384x1536, 96            89 ms      33 ms         17 ms         1.8e-6 / 5.2e-6
    2048x1024, 256          1.47 s     0.98 s        0.37 s        2.2e-6 / 5.9e-6
    1024x2048, 256          3.11 s     1.06 s        0.64 s        1.8e-6 / 3.6e-5
    4096x1024, 256          1.08 s     0.56 s        0.26 s        2.3e-6 / 2.2e-5
    4096x11008, 1024        345 s      128 s         75 s          3.7e-6 / 1.8e-3
    ======================  =========  ============  ============  ===================

    The fp64 Gram route truncates like gesdd to fp32 round-off (recon <= 4e-6, the same
    relative errors to 6 digits, U orthonormal to 1e-8 where gesdd32 reaches 1e-6) and is
    1.3-2.9x faster once the aspect ratio reaches 1.5; on square matrices it is no faster
    (0.65-1.0x). An fp32 Gram matrix is faster still but squares the condition number in fp32:
    its truncation drifts by up to 1.8e-3 with U orthonormal only to 4e-4, so it is rejected.
    Hence: CPU, fp32 compute, and max(m, n) >= 1.5 min(m, n). fp64 requests keep gesdd: the
    Gram route's relative accuracy eps64 * (sigma_1 / sigma_k)² is better than fp32 gesdd's
    eps32 * sigma_1 / sigma_k, but worse than fp64 gesdd's. On GPUs (slow fp64 on many)
    torch's own driver runs.
    """
    rows, cols = m.shape
    return (
        m.device.type == "cpu"
        and m.dtype == torch.float32
        and min(rows, cols) >= 2
        and max(rows, cols) >= 1.5 * min(rows, cols)
    )


def _lu_normalize(y: torch.Tensor) -> torch.Tensor:
    """A basis of range(y) as P·L from y's pivoted LU factorisation y = P L U.

    The cheap normaliser of the intermediate power iterations (as sklearn's
    ``randomized_range_finder`` does): |L| <= 1 keeps the basis from collapsing onto the top
    singular direction, at about half the cost of a Householder QR that forms Q (measured 0.74 s
    against 1.38 s on 11008x2048 fp32 at 2 threads). Only the last iteration needs orthonormality.
    """
    # _ex: a rank-deficient y (a delta of rank below q, e.g. an extract whose fine-tune moved a
    # weight by a constant) has an exactly zero pivot, on which lu_factor raises; LAPACK leaves
    # that column of L unscaled (zeros below it: the pivot was the column's largest), still a basis
    LU, piv, _ = torch.linalg.lu_factor_ex(y)
    if not bool(torch.isfinite(LU).all()):  # a LAPACK that divides by the zero pivot after all: QR instead
        return torch.linalg.qr(y).Q
    L = LU.tril_(-1)
    L.diagonal().fill_(1)
    # lu_factor's pivots are sequential 1-based row swaps: replay them to get the permutation
    # with y[perm[i]] = (L U)[i], then put L's rows back where y's rows were.
    perm = list(range(y.shape[0]))
    for i, p in enumerate((piv - 1).tolist()):
        perm[i], perm[p] = perm[p], perm[i]
    out = torch.empty_like(L)
    out[torch.tensor(perm, device=y.device)] = L
    return out


def _small_svd(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of the projected (q, short) matrix: the fp64 Gram route where it applies, else gesdd."""
    if _use_gram(b):
        got = _gram_svd(b, k)
        if got is not None:
            return got
    U, S, Vh = _gesdd(b)
    return U[:, :k], S[:k], Vh[:k]


def _randomized_svd(
    m: torch.Tensor, k: int, q: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder with normalised power (subspace) iterations.

    Halko, Martinsson & Tropp (2011), Algorithms 4.4 (randomized subspace iteration) and 5.1
    (direct SVD of the projected matrix). Intermediate iterations are normalised by pivoted LU
    (``_lu_normalize``), the last by QR; the subspace, and hence the result, is the one QR at
    every step would give (measured: the same relative error to 6 digits on 4096x11008, k=1024,
    and on every MiniLM layer) at 15-20% less time. The Gaussian test matrix comes from a private
    ``torch.Generator`` seeded with ``seed``, so the result depends on the seed only, not on
    the global RNG (which ``torch.svd_lowrank`` would consume).

    Args:
        m: (rows, cols) in the compute dtype.
        k: rank kept; q >= k: sketch width; power_iters: subspace iterations.

    Returns:
        U (rows, k), S (k,), Vh (k, cols).
    """
    # Sketch the range of the taller orientation so the small SVD is (q, short side).
    transposed = m.shape[0] < m.shape[1]
    a = m.T if transposed else m  # (long, short)
    gen = torch.Generator(device=a.device).manual_seed(int(seed))
    omega = torch.randn(a.shape[1], q, generator=gen, dtype=a.dtype, device=a.device)
    Y = a @ omega  # (long, q)
    for _ in range(power_iters):
        # Normalise between products (Halko Alg. 4.4): plain powers (AAᵀ)^p A Ω lose every
        # singular value below eps^(1/(2p+1)) * sigma_1 to round-off.
        Z = _lu_normalize(a.T @ _lu_normalize(Y))  # (short, q)
        Y = a @ Z
    Q = torch.linalg.qr(Y).Q  # (long, q), orthonormal
    B = Q.T @ a  # (q, short)
    Ub, S, Vh = _small_svd(B, k)
    U = Q @ Ub
    if transposed:  # a = mᵀ = U S Vh  =>  m = Vhᵀ S Uᵀ
        return Vh.T.contiguous(), S.contiguous(), U.T.contiguous()
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def truncated_svd(
    w: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    fp64: bool = False,
    oversample: int | None = None,
    power_iters: int = 2,
    seed: int = 0,
    name: str | None = None,
) -> SVDResult:
    """Rank-k truncated SVD, W ≈ U diag(S) Vh.

    Args:
        w: (m, n) Linear weight or (out, in, kh, kw) conv weight (seen as (out, in*kh*kw));
            fp16/bf16/fp32 are computed in fp32, fp64 (or ``fp64=True``) in fp64. Not modified.
        k: rank, 1 <= k <= min(m, n).
        method: "exact": the best rank-k approximation (Eckart–Young), by gesdd then
            truncation, or, for fp32 on CPU with an aspect ratio >= 1.5, by the fp64 Gram
            matrix's eigendecomposition, which truncates identically to fp32 round-off and
            measured 1.3-2.9x faster (see ``_use_gram``); "randomized": Halko et al. range
            finder (see ``default_oversample`` for its accuracy); "auto": randomized when
            k <= min(m, n) / 4, else exact.
        fp64: compute in fp64 whatever the input dtype.
        oversample: randomized only; sketch width q = k + oversample (default
            ``default_oversample(k)``). When q reaches min(m, n) the exact path is used.
        power_iters: randomized only; QR-orthonormalised subspace iterations.
        seed: randomized only; the result is a function of (w, k, options, seed).
        name: the weight's name, for error messages.

    Returns:
        SVDResult with U (m, k), S (k,) descending, Vh (k, n), in the compute dtype.

    Raises:
        InvalidOptionError: k out of range, unknown method, negative oversample/power_iters.
        FormatError: the weight holds NaN or Inf.
    """
    if method not in SVD_METHODS:
        raise InvalidOptionError(f"unknown SVD method {method!r}: choose one of {', '.join(SVD_METHODS)}")
    m = as_matrix(w)
    rows, cols = m.shape
    _check_rank(k, rows, cols)
    if oversample is not None and oversample < 0:
        raise InvalidOptionError(f"oversample must be >= 0, got {oversample}")
    if power_iters < 0:
        raise InvalidOptionError(f"power_iters must be >= 0, got {power_iters}")
    m = m.to(_compute_dtype(w, fp64))  # a copy when the dtype changes; never written to
    _check_finite(m, name)
    if method == "auto":
        # Measured at the boundary, 4096x11008, k=1024, 1 thread: the exact fp64 Gram route took
        # 32.2 CPU-s, the randomized q = 2k sketch 31.5 CPU-s (0.16% over optimal). On such
        # rectangular fp32 matrices exact is as cheap there; the k <= min/4 rule is kept (GUIDE §4).
        method = "randomized" if k <= min(rows, cols) / 4 else "exact"
    if method == "randomized":
        q = k + (default_oversample(k) if oversample is None else oversample)
        if q < min(rows, cols):
            return SVDResult(*_randomized_svd(m, k, q, power_iters, seed))
    if _use_gram(m):
        got = _gram_svd(m, k)
        if got is not None:
            return SVDResult(*got)
    U, S, Vh = _gesdd(m)
    return SVDResult(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous())


def product_rel_diff(B1: torch.Tensor, A1: torch.Tensor, B0: torch.Tensor, A0: torch.Tensor) -> float:
    """``||B1 A1 − B0 A0||_F / ||B0 A0||_F`` from the factors, never the out×in product: with
    X = [B1, −B0] and Y = [A1; A0], ``||X Y||_F^2 = sum((XᵀX) ⊙ (Y Yᵀ))`` (fp64). Used to state
    what casting composed factors to a narrow dtype (bf16, fp16) changed. Factors are seen as
    matrices (a conv's B (out, r, 1, 1) and A (r, in, kh, kw)). 0 when B0 A0 is 0 and so is the
    difference; inf when only B0 A0 is 0.
    """
    b1, a1, b0, a0 = (as_matrix(x).double() for x in (B1, A1, B0, A0))
    X = torch.cat([b1, -b0], dim=1)
    Y = torch.cat([a1, a0], dim=0)
    diff2 = max(float(((X.T @ X) * (Y @ Y.T)).sum()), 0.0)  # rounding can leave a tiny negative
    ref2 = max(float(((b0.T @ b0) * (a0 @ a0.T)).sum()), 0.0)
    if ref2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / ref2)


def truncation_error(S_all: torch.Tensor, k: int, *, relative: bool = True) -> float:
    """Frobenius error of the best rank-k approximation (Eckart–Young), from all singular values.

    sqrt(sum_{i>k} S_i²), divided by sqrt(sum S_i²) = ||W||_F when ``relative``. Exact only for
    the exact truncated SVD; for a randomized result use ``relative_error``.

    Args:
        S_all: (p,) every singular value of W, descending. k: rank kept (0..p).
    """
    s2 = S_all.double() ** 2
    dropped = float(s2[k:].sum().clamp_min(0).sqrt().item())
    if not relative:
        return dropped
    total = float(s2.sum().sqrt().item())
    return dropped / total if total > 0 else 0.0


def relative_error(w: torch.Tensor, res: SVDResult) -> float:
    """||W - U diag(S) Vh||_F / ||W||_F, computed honestly for any factorization.

    The shortcut sqrt(||W||² - ||S||²) holds only when U S Vh is the orthogonal projection of
    W onto span(U) and cancels badly when the error is small, so it is not used.

    Args:
        w: (m, n) or conv (out, in, kh, kw); not modified.
        res: U (m, k), S (k,), Vh (k, n).

    Returns:
        The relative error (0.0 when W and the residual are both zero).
    """
    return ratio_of_norms(*residual_norms(w, res))


def ratio_of_norms(err: float, ref: float) -> float:
    """err / ref, with 0/0 = 0 (a zero weight factorized exactly) and x/0 = inf."""
    if ref == 0:
        return 0.0 if err == 0 else float("inf")
    return err / ref


def residual_norms(w: torch.Tensor, res: SVDResult) -> tuple[float, float]:
    """(||W - U diag(S) Vh||_F, ||W||_F), in row blocks of about 4M elements.

    One buffer in ``res``'s dtype is reused for every block: W's rows are copied in, their norm
    taken, then the rows of U S Vh subtracted in place (``addmm_``) and the residual's norm
    taken. Block norms are summed in Python floats (fp64). No temporary of W's size, and no
    fresh allocation per block (each costs page faults when the heap returns freed memory).
    """
    m = as_matrix(w)
    dt, dev = res.U.dtype, res.U.device
    if m.shape != (res.U.shape[0], res.Vh.shape[1]):
        raise FormatError(
            f"factorization {tuple(res.U.shape)} x {tuple(res.Vh.shape)} does not match weight {tuple(m.shape)}"
        )
    US = res.U * res.S
    rows, cols = m.shape
    step = max(1, (1 << 22) // max(1, cols))
    buf = torch.empty(min(step, rows), cols, dtype=dt, device=dev)
    err2 = ref2 = 0.0
    for i in range(0, rows, step):
        j = min(rows, i + step)
        blk = buf[: j - i]
        blk.copy_(m[i:j])
        ref2 += float(torch.linalg.vector_norm(blk)) ** 2
        blk.addmm_(US[i:j], res.Vh, alpha=-1.0)
        err2 += float(torch.linalg.vector_norm(blk)) ** 2
    return err2**0.5, ref2**0.5


# ---------------------------------------------------------------------------
# Splitting S between the two factors
# ---------------------------------------------------------------------------


def split_balanced(res: SVDResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors for factorized layers (GUIDE §3): W ≈ Uf @ Vf.

    Returns:
        Uf = U diag(√S) (m, k) and Vf = diag(√S) Vh (k, n), new tensors in ``res``'s dtype.
    """
    r = res.S.clamp_min(0).sqrt()
    return res.U * r, r[:, None] * res.Vh


def split_lora(res: SVDResult) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA convention: S goes into B (up), A (down) keeps orthonormal rows. ΔW ≈ B @ A.

    Returns:
        B = U diag(S) (out, k) and A = Vh (k, in), new tensors in ``res``'s dtype.
    """
    return res.U * res.S, res.Vh.clone()


# ---------------------------------------------------------------------------
# Exact algebra on low-rank factors
# ---------------------------------------------------------------------------


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, k: int | None = None, *, fp64: bool = False) -> SVDResult:
    """Exact SVD of the product B @ A without forming the (out, in) matrix.

    ``product_svd(B, A, fp64=fp64).truncate(k)``: see there. Use ``product_svd`` directly when k
    depends on the spectrum (resize's rules, compose's error report), so that only the kept
    singular vectors are projected back.

    Returns:
        SVDResult U (out, k'), S (k',), Vh (k', in), k' = min(k, out, in, r), compute dtype.

    Raises:
        FormatError: inner dimensions differ, or a factor holds NaN/Inf.
        InvalidOptionError: k < 1.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InvalidOptionError(f"rank must be a positive integer, got {k!r}")
    return product_svd(B, A, fp64=fp64).truncate(k)


class ProductSVD:
    """The SVD of a product B @ A of low-rank factors, singular values first, vectors on demand.

    B = Q_B R_B and Aᵀ = Q_A R_A, so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the small core
    R_B R_Aᵀ = U_c S V_cᵀ gives U = Q_B U_c, Vh = V_cᵀ Q_Aᵀ. Cost O((out + in) r²) instead of
    O(out · in · min(out, in)); when r exceeds out or in the core is min(out, r) x min(in, r), so
    there are never more than min(out, in, r) components. ``S`` holds all of them;
    ``truncate(k)`` projects only the top k back to (out, k) and (k, in).

    Householder QR without forming Q (``geqrf``), with Q applied to the kept vectors only
    (``ormqr``): the back-projection costs O((out + in) r k), so truncating before it matters
    (compose svd keeps 32 of a stacked rank of 128: ``benchmarks/adapters.py --parts compose``,
    docs/benchmarks.md §6). An fp64 Cholesky-Gram variant measured no faster and was not kept.

    Args (of ``product_svd``):
        B: (out, r) or conv up (out, r, 1, 1). A: (r, in) or conv down (r, in, kh, kw); the
            product is then seen as (out, in*kh*kw). Neither is modified.
        fp64: compute in fp64 (also when either factor is fp64); otherwise fp32.
    """

    def __init__(self, S: torch.Tensor, vectors: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.S = S
        self._vectors = vectors

    def truncate(self, k: int | None = None) -> SVDResult:
        """Top-k SVDResult (k=None or k beyond S keeps every component), in the compute dtype."""
        kk = self.S.numel() if k is None else max(1, min(k, self.S.numel()))
        U, Vh = self._vectors(kk)
        return SVDResult(U.contiguous(), self.S[:kk].contiguous(), Vh.contiguous())


def product_svd(B: torch.Tensor, A: torch.Tensor, *, fp64: bool = False) -> ProductSVD:
    """The ProductSVD of B @ A (see there).

    Raises:
        FormatError: inner dimensions differ, or a factor holds NaN/Inf.
    """
    b, a = as_matrix(B), as_matrix(A)
    if b.shape[1] != a.shape[0]:
        raise FormatError(f"factor shapes do not chain: B {tuple(B.shape)} and A {tuple(A.shape)}")
    dt = torch.float64 if (fp64 or b.dtype == torch.float64 or a.dtype == torch.float64) else torch.float32
    b, a = b.to(dt), a.to(dt)
    _check_finite(b, "B")
    _check_finite(a, "A")
    # Householder QR without forming Q (geqrf), and Q applied to the kept singular vectors only
    # (ormqr): 4096x128 fp32, 2 threads, geqrf 3.3 ms against 8.1 ms for linalg.qr with Q formed.
    hb, tb = torch.geqrf(b)  # B = Q_B R_B
    ha, ta = torch.geqrf(a.T)  # Aᵀ = Q_A R_A
    pb, pa = min(b.shape), min(a.shape)
    Rb = hb[:pb].triu()  # (min(out, r), r)
    Ra = ha[:pa].triu()  # (min(in, r), r)
    Uc, S, Vch = _gesdd(Rb @ Ra.T)  # core (min(out, r), min(in, r))

    def vectors(kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        U = _apply_q(hb, tb, Uc[:, :kk])  # Q_B [Uc; 0]: (out, kk)
        V = _apply_q(ha, ta, Vch[:kk].T)  # Q_A [Vc; 0]: (in, kk)
        return U, V.T

    return ProductSVD(S, vectors)


def _apply_q(h: torch.Tensor, tau: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Q @ [c; 0] for the Q of a geqrf factorisation (h, tau), without forming Q.

    Args:
        h, tau: geqrf of an (m, r) matrix. c: (min(m, r), k).

    Returns:
        (m, k).
    """
    full = torch.zeros(h.shape[0], c.shape[1], dtype=c.dtype, device=c.device)
    full[: c.shape[0]] = c
    return torch.ormqr(h, tau, full)


def stack_factors(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]], *, fp64: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a weighted sum of low-rank products.

    Σ c_i B_i A_i = [B_1 … B_n] · [c_1 A_1; …; c_n A_n]: each coefficient (weight times
    scale) is applied exactly once, to A (applying it to both factors, or to the summed
    factors, is the bug class of peft#3111 and sd-scripts#868).

    Args:
        pairs: (B_i, A_i, c_i) with B_i (out, r_i[, 1, 1]), A_i (r_i, in[, kh, kw]); all B_i
            share out and all A_i share their trailing shape. Not modified.
        fp64: compute in fp64 (also when any factor is fp64); otherwise fp32.

    Returns:
        B_cat (out, Σr_i[, 1, 1]) and A_cat (Σr_i, in[, kh, kw]), new tensors in the compute dtype.

    Raises:
        FormatError: no pairs, or shapes that do not chain or agree.
    """
    pairs = list(pairs)
    if not pairs:
        raise FormatError("nothing to stack: no (B, A, coefficient) pairs given")
    any64 = fp64 or any(b.dtype == torch.float64 or a.dtype == torch.float64 for b, a, _ in pairs)
    dt = torch.float64 if any64 else torch.float32
    b0, a0 = pairs[0][0], pairs[0][1]
    bs, as_ = [], []
    for i, (b, a, c) in enumerate(pairs):
        if b.ndim != b0.ndim or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
            raise FormatError(f"pair {i}: B shape {tuple(b.shape)} does not match {tuple(b0.shape)}")
        if a.ndim != a0.ndim or a.shape[1:] != a0.shape[1:]:
            raise FormatError(f"pair {i}: A shape {tuple(a.shape)} does not match {tuple(a0.shape)}")
        if b.shape[1] != a.shape[0]:
            raise FormatError(f"pair {i}: factor shapes do not chain: B {tuple(b.shape)}, A {tuple(a.shape)}")
        coeff = float(c)  # a Python float (double): exact for fp32/fp64 and 0-d tensors
        bs.append(b.to(dt))
        as_.append(a.to(dt) * coeff)  # a new tensor: the caller's A is untouched
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)
