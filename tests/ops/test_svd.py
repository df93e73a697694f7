"""Truncated SVD (exact, randomized, Gram route), error measures, splits, and exact low-rank algebra.

Every check compares against an independent dense computation (torch.linalg.svd / svdvals of
the full matrix) with an explicit tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from lorasurgeon.errors import FormatError, InvalidOptionError
from lorasurgeon.ops import svd


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and OpenMP spin-waits make them crawl on a busy CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def power_law(m: int, n: int, alpha: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W = U diag(S) Vᵀ with random orthonormal U, V and S_i = i^-alpha (fp64)."""
    g = gen(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    S = torch.arange(1, p + 1, dtype=torch.float64) ** -alpha
    return (U * S) @ V.T, S


def best_rank_k(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def recon(res: svd.SVDResult) -> torch.Tensor:
    return (res.U * res.S) @ res.Vh


def assert_orthonormal_columns(Q: torch.Tensor, tol: float) -> None:
    eye = torch.eye(Q.shape[1], dtype=Q.dtype)
    assert float((Q.T @ Q - eye).abs().max()) < tol


# ---------------------------------------------------------------------------
# truncated_svd: exact
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (8, 3, 3, 3)])
def test_exact_truncation_error_is_root_of_dropped_energy(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape, generator=gen())
    m = svd.as_matrix(w)
    k = 3 if len(shape) == 4 else 10
    res = svd.truncated_svd(w, k, method="exact")
    assert res.U.shape == (m.shape[0], k) and res.S.shape == (k,) and res.Vh.shape == (k, m.shape[1])
    S_all = torch.linalg.svdvals(m.double())
    expected = math.sqrt(float((S_all[k:] ** 2).sum() / (S_all**2).sum()))
    assert svd.truncation_error(S_all, k) == pytest.approx(expected, rel=1e-12)
    assert svd.relative_error(w, res) == pytest.approx(expected, rel=1e-5)
    assert svd.truncation_error(S_all, k, relative=False) == pytest.approx(
        expected * float(m.double().norm()), rel=1e-12
    )
    torch.testing.assert_close(res.S.double(), S_all[:k], rtol=1e-5, atol=0)


def test_exact_fp64_matches_dense_best_rank_k() -> None:
    W, _ = power_law(50, 30, alpha=1.0)
    res = svd.truncated_svd(W, 7, method="exact")
    assert res.S.dtype == torch.float64
    assert rel(recon(res), best_rank_k(W, 7)) < 1e-12
    assert_orthonormal_columns(res.U, 1e-12)
    assert_orthonormal_columns(res.Vh.T, 1e-12)


def test_full_rank_truncation_is_exact() -> None:
    w = torch.randn(20, 12, generator=gen(), dtype=torch.float64)
    res = svd.truncated_svd(w, 12, method="exact")
    assert svd.relative_error(w, res) < 1e-13
    assert svd.truncation_error(torch.linalg.svdvals(w), 12) == 0.0


# ---------------------------------------------------------------------------
# truncated_svd: randomized and auto
# ---------------------------------------------------------------------------


def test_randomized_within_one_percent_of_optimal_on_power_law() -> None:
    # The slowly decaying spectrum S_i ∝ i^-0.5 is the hard case for a range finder.
    W, S = power_law(512, 128)
    w = W.float()
    k = 32
    optimal = svd.truncation_error(S, k)
    for seed in range(2):
        res = svd.truncated_svd(w, k, method="randomized", seed=seed)
        assert res.U.shape == (512, k) and res.Vh.shape == (k, 128)
        err = svd.relative_error(w, res)
        assert optimal <= err * (1 + 1e-5)  # nothing beats Eckart–Young
        assert err <= 1.01 * optimal, (seed, err / optimal - 1)


def test_randomized_wide_matrix_and_orthonormal_factors() -> None:
    W, S = power_law(120, 400, alpha=1.0)
    res = svd.truncated_svd(W, 20, method="randomized")
    assert res.U.shape == (120, 20) and res.Vh.shape == (20, 400)
    assert_orthonormal_columns(res.U, 1e-10)
    assert_orthonormal_columns(res.Vh.T, 1e-10)
    assert svd.relative_error(W, res) <= 1.01 * svd.truncation_error(S, 20)
    assert bool((res.S[:-1] >= res.S[1:]).all())


def test_randomized_deterministic_for_a_seed_and_leaves_global_rng_alone() -> None:
    w = torch.randn(200, 120, generator=gen())
    state = torch.random.get_rng_state()
    a = svd.truncated_svd(w, 10, method="randomized", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)  # the global RNG must not matter
    b = svd.truncated_svd(w, 10, method="randomized", seed=7)
    for x, y in zip((a.U, a.S, a.Vh), (b.U, b.S, b.Vh)):
        assert torch.equal(x, y)
    c = svd.truncated_svd(w, 10, method="randomized", seed=8)
    assert not torch.equal(a.U, c.U)


def test_randomized_rank_deficient_matrix_is_recovered() -> None:
    g = gen()
    w = torch.randn(100, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 80, generator=g, dtype=torch.float64
    )
    res = svd.truncated_svd(w, 10, method="randomized")
    assert svd.relative_error(w, res) < 1e-12
    assert float(res.S[5:].abs().max()) < 1e-10 * float(res.S[0])


def test_randomized_falls_back_to_exact_when_sketch_covers_the_matrix() -> None:
    w = torch.randn(30, 20, generator=gen(), dtype=torch.float64)
    r = svd.truncated_svd(w, 8, method="randomized", oversample=12)  # q = 20 = min(m, n)
    e = svd.truncated_svd(w, 8, method="exact")
    assert rel(recon(r), recon(e)) < 1e-12


def test_auto_picks_randomized_below_a_quarter_and_exact_above() -> None:
    w = torch.randn(160, 80, generator=gen())
    assert torch.equal(
        svd.truncated_svd(w, 20, method="auto").U, svd.truncated_svd(w, 20, method="randomized").U
    )
    assert torch.equal(svd.truncated_svd(w, 21, method="auto").U, svd.truncated_svd(w, 21, method="exact").U)


def test_default_oversample_rule_is_q_equals_2k() -> None:
    assert [svd.default_oversample(k) for k in (1, 8, 10, 96, 1024)] == [10, 10, 10, 96, 1024]


# ---------------------------------------------------------------------------
# dtypes, inputs, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_half_precision_inputs_compute_and_return_fp32(dtype: torch.dtype, method: str) -> None:
    w = torch.randn(64, 48, generator=gen()).to(dtype)
    res = svd.truncated_svd(w, 8, method=method)
    for t in (res.U, res.S, res.Vh):
        assert t.dtype == torch.float32
    # Same answer as factorizing the exactly upcast matrix.
    ref = svd.truncated_svd(w.float(), 8, method=method)
    torch.testing.assert_close(recon(res), recon(ref), rtol=0, atol=1e-5)
    assert svd.relative_error(w, res) == pytest.approx(svd.relative_error(w.float(), ref), rel=1e-5)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_fp64_input_or_flag_computes_in_fp64(method: str) -> None:
    w = torch.randn(64, 48, generator=gen())
    assert svd.truncated_svd(w.double(), 8, method=method).U.dtype == torch.float64
    res = svd.truncated_svd(w.half(), 8, method=method, fp64=True)
    assert res.U.dtype == res.S.dtype == res.Vh.dtype == torch.float64


def test_no_function_mutates_its_inputs() -> None:
    g = gen()
    tensors = {
        "w32": torch.randn(40, 30, generator=g),
        "w16": torch.randn(40, 30, generator=g).half(),
        "conv": torch.randn(8, 4, 3, 3, generator=g),
        "B": torch.randn(40, 6, generator=g),
        "A": torch.randn(6, 30, generator=g),
    }
    before = {n: t.clone() for n, t in tensors.items()}
    for name in ("w32", "w16", "conv"):
        for method in ("exact", "randomized", "auto"):
            res = svd.truncated_svd(tensors[name], 4, method=method)
            svd.relative_error(tensors[name], res)
            snapshot = [res.U.clone(), res.S.clone(), res.Vh.clone()]
            for f in (svd.split_balanced, svd.split_lora):
                x, y = f(res)
                x.add_(1.0)  # outputs are new tensors, not views of res
                y.add_(1.0)
            assert all(torch.equal(a, b) for a, b in zip(snapshot, (res.U, res.S, res.Vh)))
    svd.lowrank_svd(tensors["B"], tensors["A"], 3)
    Bc, Ac = svd.stack_factors([(tensors["B"], tensors["A"], 1.0), (tensors["B"], tensors["A"], 0.5)])
    Bc.add_(1.0)
    Ac.add_(1.0)
    for n, t in tensors.items():
        assert torch.equal(t, before[n]), n


def test_invalid_rank_method_and_values_are_refused() -> None:
    w = torch.randn(10, 6, generator=gen())
    for k in (0, 7, -1):
        with pytest.raises(InvalidOptionError):
            svd.truncated_svd(w, k)
    with pytest.raises(InvalidOptionError):
        svd.truncated_svd(w, 2, method="lanczos")
    with pytest.raises(InvalidOptionError):
        svd.truncated_svd(w, 2, oversample=-1)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FormatError):
        svd.truncated_svd(bad, 2, name="layer.weight")
    with pytest.raises(FormatError):
        svd.lowrank_svd(torch.randn(10, 3), torch.randn(4, 6))
    with pytest.raises(InvalidOptionError):
        svd.lowrank_svd(torch.randn(10, 3), torch.randn(3, 6), 0)
    with pytest.raises(FormatError):
        svd.relative_error(w, svd.truncated_svd(w.T, 2))


# ---------------------------------------------------------------------------
# Gram route for exact mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)])
def test_gram_route_truncates_like_gesdd(shape: tuple[int, int]) -> None:
    W, S = power_law(*shape, alpha=0.5)
    w = W.float()
    k = 12
    got = svd._gram_svd(w, k)
    assert got is not None
    U, Sg, Vh = got
    assert U.dtype == torch.float32
    ref = best_rank_k(w.double(), k)
    assert rel((U.double() * Sg.double()) @ Vh.double(), ref) < 1e-5
    torch.testing.assert_close(Sg.double(), S[:k], rtol=1e-5, atol=0)
    assert_orthonormal_columns(U.double(), 1e-5)
    assert_orthonormal_columns(Vh.T.double(), 1e-5)


def test_exact_mode_routes_fp32_rectangular_cpu_matrices_through_gram() -> None:
    assert svd._use_gram(torch.empty(90, 40))
    assert svd._use_gram(torch.empty(40, 90))
    assert not svd._use_gram(torch.empty(60, 50))  # near square: gesdd is as fast
    assert not svd._use_gram(torch.empty(90, 40, dtype=torch.float64))  # fp64 keeps gesdd
    W, _ = power_law(90, 40, alpha=1.0)
    res = svd.truncated_svd(W.half(), 10, method="exact")
    got = svd._gram_svd(W.half().float(), 10)
    assert got is not None and torch.equal(res.U, got[0])
    assert rel(recon(res).double(), best_rank_k(W.half().double(), 10)) < 1e-5


def test_gram_route_declines_when_kept_values_are_below_its_precision() -> None:
    W, _ = power_law(60, 40, alpha=6.0)  # S_40 / S_1 = 40^-6 ≈ 2.4e-10
    w = W.float()
    assert svd._gram_svd(w, 40) is None
    assert svd._gram_svd(w, 5) is not None  # S_5 / S_1 = 6.4e-5
    # exact mode then falls back to gesdd
    res = svd.truncated_svd(w, 40, method="exact")
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.equal(res.S, S) and torch.equal(res.U, U)


# ---------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------


def test_split_balanced_and_lora_reconstruct() -> None:
    w = torch.randn(30, 20, generator=gen(), dtype=torch.float64)
    res = svd.truncated_svd(w, 6, method="exact")
    Uf, Vf = svd.split_balanced(res)
    assert Uf.shape == (30, 6) and Vf.shape == (6, 20)
    torch.testing.assert_close(Uf @ Vf, recon(res), rtol=0, atol=1e-12)
    # balanced: column i of Uf and row i of Vf both have norm sqrt(S_i)
    torch.testing.assert_close(Uf.norm(dim=0), res.S.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(Vf.norm(dim=1), res.S.sqrt(), rtol=1e-12, atol=0)
    B, A = svd.split_lora(res)
    assert B.shape == (30, 6) and A.shape == (6, 20)
    torch.testing.assert_close(B @ A, recon(res), rtol=0, atol=1e-12)
    assert_orthonormal_columns(A.T, 1e-12)
    torch.testing.assert_close(B.norm(dim=0), res.S, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# lowrank_svd and stack_factors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_, r, in_",
    [
        (30, 5, 20),  # r < min(out, in)
        (12, 25, 10),  # r > out and r > in
        (8, 20, 40),  # out < r < in
        (40, 20, 8),  # in < r < out
        (16, 16, 16),
    ],
)
def test_lowrank_svd_equals_svd_of_dense_product(out_: int, r: int, in_: int) -> None:
    g = gen(out_ + r + in_)
    B = torch.randn(out_, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, in_, generator=g, dtype=torch.float64)
    dense = B @ A
    res = svd.lowrank_svd(B, A)
    p = min(out_, in_, r)
    assert res.U.shape == (out_, p) and res.S.shape == (p,) and res.Vh.shape == (p, in_)
    torch.testing.assert_close(res.S, torch.linalg.svdvals(dense)[:p], rtol=1e-5, atol=0)
    assert rel(recon(res), dense) < 1e-12
    assert_orthonormal_columns(res.U, 1e-12)
    assert_orthonormal_columns(res.Vh.T, 1e-12)


def test_lowrank_svd_fp32_inputs_and_fp64_flag() -> None:
    g = gen()
    B, A = torch.randn(20, 4, generator=g).half(), torch.randn(4, 15, generator=g).bfloat16()
    assert svd.lowrank_svd(B, A).S.dtype == torch.float32
    res = svd.lowrank_svd(B, A, fp64=True)
    assert res.S.dtype == torch.float64
    assert rel(recon(res), B.double() @ A.double()) < 1e-12


def test_lowrank_svd_conv_shapes() -> None:
    g = gen()
    B = torch.randn(16, 4, 1, 1, generator=g, dtype=torch.float64)  # 1x1 up conv
    A = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)  # kxk down conv
    dense = B.reshape(16, 4) @ A.reshape(4, 27)
    res = svd.lowrank_svd(B, A)
    assert res.U.shape == (16, 4) and res.Vh.shape == (4, 27)
    torch.testing.assert_close(res.S, torch.linalg.svdvals(dense)[:4], rtol=1e-5, atol=0)
    assert rel(recon(res), dense) < 1e-12
    res2 = svd.lowrank_svd(B, A, 2)
    assert rel(recon(res2), best_rank_k(dense, 2)) < 1e-10


@pytest.mark.parametrize("k", [1, 3, 6])
def test_lowrank_svd_truncation_is_eckart_young(k: int) -> None:
    g = gen(k)
    B = torch.randn(50, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 35, generator=g, dtype=torch.float64)
    dense = B @ A
    res = svd.lowrank_svd(B, A, k)
    assert res.S.shape == (k,)
    assert rel(recon(res), best_rank_k(dense, k)) < 1e-10
    S_all = torch.linalg.svdvals(dense)
    assert svd.relative_error(dense, res) == pytest.approx(svd.truncation_error(S_all, k), rel=1e-8)
    # k beyond the product's rank keeps what there is
    assert svd.lowrank_svd(B, A, 20).S.shape == (8,)


def test_product_svd_spectrum_first_then_kept_vectors() -> None:
    g = gen()
    B = torch.randn(60, 12, generator=g, dtype=torch.float64)
    A = torch.randn(12, 45, generator=g, dtype=torch.float64)
    dense = B @ A
    p = svd.product_svd(B, A)
    torch.testing.assert_close(p.S, torch.linalg.svdvals(dense)[:12], rtol=1e-10, atol=0)
    for k in (1, 5, 12, 40):
        res = p.truncate(k)
        kk = min(k, 12)
        assert res.U.shape == (60, kk) and res.S.shape == (kk,) and res.Vh.shape == (kk, 45)
        assert rel(recon(res), best_rank_k(dense, kk)) < 1e-10
        full = svd.lowrank_svd(B, A, k)
        torch.testing.assert_close(recon(res), recon(full), rtol=0, atol=1e-12)
    assert p.truncate(None).S.shape == (12,)


def test_lowrank_svd_rejects_non_finite() -> None:
    B = torch.randn(40, 4)
    A = torch.randn(4, 30)
    B[3, 1] = float("nan")
    with pytest.raises(FormatError, match="NaN or Inf"):
        svd.lowrank_svd(B, A)
    A[0, 0] = float("inf")
    with pytest.raises(FormatError, match="NaN or Inf"):
        svd.lowrank_svd(torch.randn(40, 4), A)


def test_stack_factors_equals_dense_weighted_sum() -> None:
    g = gen()
    pairs = [
        (
            torch.randn(24, r, generator=g, dtype=torch.float64),
            torch.randn(r, 18, generator=g, dtype=torch.float64),
            c,
        )
        for r, c in ((4, 0.7), (2, -1.5), (8, 2.0))
    ]
    dense = sum(c * (b @ a) for b, a, c in pairs)
    Bc, Ac = svd.stack_factors(pairs)
    assert Bc.shape == (24, 14) and Ac.shape == (14, 18)
    torch.testing.assert_close(Bc @ Ac, dense, rtol=0, atol=1e-12)
    # each coefficient applied exactly once: B blocks are the inputs, A blocks carry c_i
    torch.testing.assert_close(Bc[:, :4], pairs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(Ac[4:6], -1.5 * pairs[1][1], rtol=0, atol=0)
    # compose by SVD: exact when the target rank covers the stack
    res = svd.lowrank_svd(Bc, Ac)
    assert rel(recon(res), dense) < 1e-12


def test_stack_factors_conv_and_dtypes() -> None:
    g = gen()
    pairs = [
        (torch.randn(8, r, 1, 1, generator=g).half(), torch.randn(r, 3, 3, 3, generator=g).half(), c)
        for r, c in ((2, 0.5), (3, torch.tensor(2.0)))
    ]
    Bc, Ac = svd.stack_factors(pairs)
    assert Bc.shape == (8, 5, 1, 1) and Ac.shape == (5, 3, 3, 3)
    assert Bc.dtype == Ac.dtype == torch.float32
    dense = sum(float(c) * (svd.as_matrix(b).float() @ svd.as_matrix(a).float()) for b, a, c in pairs)
    torch.testing.assert_close(svd.as_matrix(Bc) @ svd.as_matrix(Ac), dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(FormatError):
        svd.stack_factors([])
    with pytest.raises(FormatError):
        svd.stack_factors(
            [(torch.randn(8, 2), torch.randn(2, 5), 1.0), (torch.randn(7, 2), torch.randn(2, 5), 1.0)]
        )


@pytest.mark.parametrize("shape", [(300, 40), (41, 40), (500, 7)])
def test_lu_normalize_spans_the_same_range(shape: tuple[int, int]) -> None:
    y = torch.randn(*shape, generator=gen(3), dtype=torch.float64)
    pl = svd._lu_normalize(y)
    assert pl.shape == y.shape and pl.abs().max() <= 1.0 + 1e-12  # partial pivoting bounds |L|
    # P·L·U = y with U invertible: y's columns are combinations of P·L's, and both have full rank
    coef = torch.linalg.lstsq(pl, y).solution
    assert torch.allclose(pl @ coef, y, atol=1e-10)
    assert torch.linalg.matrix_rank(pl) == shape[1]


def test_randomized_lu_power_iterations_match_qr_iterations() -> None:
    """The LU-normalised iterations give the subspace QR-normalised ones give: the same result."""
    w, _ = power_law(400, 900, seed=5)
    w = w.float()
    k, q = 40, 80
    got = svd._randomized_svd(w, k, q, 2, seed=1)
    # the same algorithm with QR at every step, written out independently
    a = w.T
    omega = torch.randn(a.shape[1], q, generator=torch.Generator().manual_seed(1), dtype=a.dtype)
    Q = torch.linalg.qr(a @ omega).Q
    for _ in range(2):
        Q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ Q).Q).Q
    ub, s, vh = torch.linalg.svd(Q.T @ a, full_matrices=False)
    ref_u, ref_s, ref_vh = vh[:k].T, s[:k], (Q @ ub[:, :k]).T
    assert torch.allclose(got[1], ref_s, rtol=1e-4)
    assert torch.allclose((got[0] * got[1]) @ got[2], (ref_u * ref_s) @ ref_vh, atol=1e-5)


def test_all_finite_exact_when_the_sum_overflows() -> None:
    from lorasurgeon._finite import all_finite

    big = torch.full((5000,), 60000.0, dtype=torch.float16)  # finite entries, the sum overflows fp16
    assert not bool(torch.isfinite(big.sum()))
    assert all_finite(big)
    big[4321] = float("inf")
    assert not all_finite(big)
    pos_neg = torch.tensor([float("inf"), float("-inf")])  # the sum is NaN, the fast path still says no
    assert not all_finite(pos_neg)
    assert all_finite(torch.tensor([1, 2, 3]))  # integers are always finite
    assert all_finite(torch.empty(0))


@pytest.mark.parametrize("kind", ["constant", "rank3", "zero-rows"])
def test_randomized_on_an_exactly_rank_deficient_matrix(kind: str) -> None:
    """A matrix of exact rank below the sketch width (a fine-tune that shifted a weight by a
    constant, then extract at rank 2) made the power iterations' pivoted LU raise on a zero pivot:
    an internal error. The randomized result now equals the exact one."""
    g = torch.Generator().manual_seed(0)
    m = {"constant": torch.full((48, 40), 0.1),
         "rank3": torch.randn(48, 3, generator=g) @ torch.randn(3, 40, generator=g),
         "zero-rows": torch.cat([torch.randn(8, 40, generator=g), torch.zeros(40, 40)])}[kind]
    for k in (1, 2, 5):
        r = svd.truncated_svd(m, k, method="randomized", seed=0)
        e = svd.truncated_svd(m, k, method="exact")
        assert torch.isfinite(r.U).all() and torch.isfinite(r.Vh).all()
        assert torch.allclose(r.S, e.S, atol=1e-4 * float(e.S[0]))
        best = float(((e.U * e.S) @ e.Vh - m).norm())
        assert float(((r.U * r.S) @ r.Vh - m).norm()) <= best * 1.01 + 1e-5 * float(m.norm())
