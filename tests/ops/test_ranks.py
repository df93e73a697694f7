"""Rank rules and the global budget (lorasurgeon.ops.ranks), against hand computations and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lorasurgeon.errors import EXIT_ERROR, InvalidOptionError
from lorasurgeon.ops import ranks as R
from lorasurgeon.ops.ranks import (
    LayerSpectrum,
    RankRule,
    allocate_budget,
    allocate_budget_exact,
    apply_break_even,
    break_even,
    budget_from_fraction,
    choose_layer_rank,
    min_budget,
    plan_budget,
    select_rank,
)


def _s(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Per-layer rules
# ---------------------------------------------------------------------------------------------------------


def test_guide_worked_example() -> None:
    """S = [4, 2, 1, 0.5]. sd-scripts since PR #2194: sv_fro 0.9 -> 2 (0.9412 of the energy >= 0.81),
    sv_ratio 3 -> 2 (4 and 2 are > 4/3), sv_cumulative 0.9 -> 3 (shares 0.533, 0.8, 0.933).
    Before it (GUIDE §4's example, ``kohya_legacy``): one more each, 3, 3 and 4."""
    S = _s(4, 2, 1, 0.5)
    assert select_rank(S, RankRule("sv_fro", 0.9)) == 2
    assert select_rank(S, RankRule("sv_ratio", 3)) == 2
    assert select_rank(S, RankRule("sv_cumulative", 0.9)) == 3
    assert select_rank(S, RankRule("sv_fro", 0.9, kohya_legacy=True)) == 3
    assert select_rank(S, RankRule("sv_ratio", 3, kohya_legacy=True)) == 3
    assert select_rank(S, RankRule("sv_cumulative", 0.9, kohya_legacy=True)) == 4


def _kohya_reference(S: list[float], kind: str, t: float, new_rank: int, legacy: bool) -> int:
    """sd-scripts networks/resize_lora.py, transcribed: index_sv_* then rank_resize's caps.
    Current (commit 063ef10, after PR #2194) and, with ``legacy``, as before that PR."""
    s = torch.tensor(S, dtype=torch.float64)
    if kind == "sv_ratio":
        index = int(torch.sum(s > s[0] / t).item()) - (0 if legacy else 1)
    elif kind == "sv_cumulative":
        cum = torch.cumsum(s, dim=0) / float(torch.sum(s))
        index = int(torch.searchsorted(cum, t)) + (1 if legacy else 0)
    else:
        s2 = s.pow(2)
        cum = torch.cumsum(s2, dim=0) / float(torch.sum(s2))
        index = int(torch.searchsorted(cum, t**2)) + (1 if legacy else 0)
    index = max(1 if legacy else 0, min(index, len(s) - 1))
    rank = index + 1
    if s[0] <= 1e-6:
        rank = 1
    elif rank > new_rank:
        rank = new_rank
    return rank


@pytest.mark.parametrize("legacy", [False, True])
def test_kohya_rules_match_transcribed_reference(legacy: bool) -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        S = sorted(rng.exponential(1.0, n).tolist(), reverse=True)
        if rng.random() < 0.3:  # an adapter's spectrum padded with zeros
            r = int(rng.integers(1, n + 1))
            S = S[:r] + [0.0] * (n - r)
        new_rank = int(rng.integers(1, n + 3))
        for kind, t in (
            ("sv_ratio", float(rng.uniform(1, 20))),
            ("sv_fro", float(rng.uniform(0.05, 1))),
            ("sv_cumulative", float(rng.uniform(0.05, 1))),
        ):
            want = min(_kohya_reference(S, kind, t, new_rank, legacy), n)
            got = select_rank(torch.tensor(S), RankRule(kind, t, max_rank=new_rank, kohya_legacy=legacy))
            assert got == want, (S, kind, t)


def test_kohya_legacy_is_only_for_the_kohya_rules() -> None:
    with pytest.raises(InvalidOptionError, match=r"^--kohya-legacy applies to --sv-ratio, --sv-fro and --sv-cumulative, not --energy$"):
        RankRule("energy", 0.9, kohya_legacy=True)


def test_fixed_rank_capped_by_length_and_max_rank() -> None:
    S = _s(4, 3, 2, 1)
    assert select_rank(S, RankRule("rank", 2)) == 2
    assert select_rank(S, RankRule("rank", 10)) == 4
    assert select_rank(S, RankRule("rank", 3, max_rank=2)) == 2


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [
        (5, 0.5, 3),  # 2.5 rounds half up
        (10, 0.35, 4),  # 3.4999999999999996 in fp64 still counts as 3.5
        (10, 0.34, 3),
        (10, 0.36, 4),
        (4, 0.1, 1),  # 0.4 -> 0 -> at least 1
        (7, 1.0, 7),
        (8, 0.25, 2),
    ],
)
def test_ratio_rounding(n: int, ratio: float, k: int) -> None:
    S = torch.linspace(n, 1, n, dtype=torch.float64)
    assert select_rank(S, RankRule("ratio", ratio)) == k


def test_energy_by_hand() -> None:
    # S^2 = [9, 4, 1, 1], total 15: cumulative shares 0.6, 0.8667, 0.9333, 1
    S = _s(3, 2, 1, 1)
    assert select_rank(S, RankRule("energy", 0.6)) == 1  # 9/15 reaches 0.6 exactly
    assert select_rank(S, RankRule("energy", 0.61)) == 2
    assert select_rank(S, RankRule("energy", 0.9)) == 3
    assert select_rank(S, RankRule("energy", 14 / 15)) == 3
    assert select_rank(S, RankRule("energy", 1.0)) == 4
    assert select_rank(S, RankRule("energy", 0.99, max_rank=2)) == 2
    assert select_rank(torch.zeros(5), RankRule("energy", 0.9)) == 1


def test_energy_differs_from_sv_fro() -> None:
    """sv_fro squares its threshold (and, legacy, keeps one more value); energy does neither."""
    S = _s(4, 2, 1, 0.5)  # energy shares 0.7529, 0.9412, 0.9882, 1
    assert select_rank(S, RankRule("energy", 0.95)) == 3
    assert select_rank(S, RankRule("sv_fro", 0.95)) == 2  # asks for 0.9025 of the energy
    assert select_rank(S, RankRule("sv_fro", 0.95, kohya_legacy=True)) == 3


def test_kohya_edge_cases() -> None:
    S = _s(4, 2, 1, 0.5)
    # a zero matrix (S0 <= 1e-6) gets rank 1 whatever the rule, even past the legacy clamp to >= 2
    for kind, t in (("sv_ratio", 10.0), ("sv_fro", 0.9), ("sv_cumulative", 0.5)):
        for legacy in (False, True):
            assert select_rank(_s(1e-7, 1e-8, 0, 0), RankRule(kind, t, kohya_legacy=legacy)) == 1
            assert select_rank(torch.zeros(4), RankRule(kind, t, kohya_legacy=legacy)) == 1
    # S0 just above MIN_SV: energy shares 0.8, 1, 1; 0.8 >= 0.25 at the first value
    assert select_rank(_s(2e-6, 1e-6, 0), RankRule("sv_fro", 0.5)) == 1
    assert select_rank(_s(2e-6, 1e-6, 0), RankRule("sv_fro", 0.5, kohya_legacy=True)) == 2
    # every value needed: k = n under both
    for legacy in (False, True):
        assert select_rank(_s(1, 1, 1, 1), RankRule("sv_ratio", 2, kohya_legacy=legacy)) == 4  # all 4 above 0.5
        assert select_rank(S, RankRule("sv_fro", 1.0, kohya_legacy=legacy)) == 4
        assert select_rank(S, RankRule("sv_cumulative", 1.0, kohya_legacy=legacy)) == 4
    # the first value meets the criterion: 1, where the legacy clamp to >= 1 then +1 gives 2
    assert select_rank(S, RankRule("sv_cumulative", 0.1)) == 1
    assert select_rank(S, RankRule("sv_cumulative", 0.1, kohya_legacy=True)) == 2
    # no value (or none strictly) above S0/t: the clamp keeps 1 (legacy: 2)
    assert select_rank(S, RankRule("sv_ratio", 0.5)) == 1
    assert select_rank(S, RankRule("sv_ratio", 1.0)) == 1
    assert select_rank(S, RankRule("sv_ratio", 1.0, kohya_legacy=True)) == 2
    # n = 1: the legacy clamp gives 2, capped at n
    assert select_rank(_s(5), RankRule("sv_fro", 0.5)) == 1
    assert select_rank(_s(5), RankRule("sv_fro", 0.5, kohya_legacy=True)) == 1
    # sv_ratio threshold exactly at a value: strict comparison (S > S0/t)
    assert select_rank(S, RankRule("sv_ratio", 4)) == 2  # S > 1: {4, 2}
    assert select_rank(S, RankRule("sv_ratio", 4, kohya_legacy=True)) == 3
    # max_rank caps kohya's rules too
    assert select_rank(S, RankRule("sv_cumulative", 0.9, max_rank=2)) == 2


def test_adapter_spectrum_padding_changes_the_legacy_kohya_result() -> None:
    """kohya's n is min(out, in) of the dense delta: pad an adapter's r values with zeros. Before
    PR #2194 the clamp to n - 1 made the padding matter; since, it does not."""
    S = _s(3, 1)  # cumulative shares [0.75, 1]; padded to 4: [0.75, 1, 1, 1]
    legacy = RankRule("sv_cumulative", 0.99, kohya_legacy=True)
    assert select_rank(S, legacy) == 2  # n = 2: i = 2 clamped to 1 -> 2
    assert select_rank(_s(3, 1, 0, 0), legacy) == 3  # n = 4: i = 2 -> 3
    assert choose_layer_rank(S, 8, 8, legacy) == 3  # choose_layer_rank pads to min(m, n) itself
    rule = RankRule("sv_cumulative", 0.99)
    assert select_rank(S, rule) == select_rank(_s(3, 1, 0, 0), rule) == choose_layer_rank(S, 8, 8, rule) == 2


def test_select_rank_is_pure_and_dtype_agnostic() -> None:
    S = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float32, requires_grad=True)
    before = S.detach().clone()
    assert select_rank(S, RankRule("sv_fro", 0.9)) == 2
    assert torch.equal(S.detach(), before)
    assert select_rank(S.detach().to(torch.bfloat16), RankRule("energy", 0.95)) == 3


@pytest.mark.parametrize("bad", [torch.zeros(0), torch.ones(2, 2), _s(1, 2), _s(1, -1), _s(1, float("nan"))])
def test_select_rank_rejects_malformed_spectra(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        select_rank(bad, RankRule("rank", 1))


def test_break_even() -> None:
    assert break_even(6, 3) == 2.0
    assert break_even(384, 1536) == pytest.approx(307.2)
    assert apply_break_even(1, 6, 3) == 1  # 9 < 18
    assert apply_break_even(2, 6, 3) is None  # 18 parameters, no saving: stay dense
    assert apply_break_even(307, 384, 1536) == 307
    assert apply_break_even(308, 384, 1536) is None
    with pytest.raises(ValueError):
        break_even(0, 3)


def test_choose_layer_rank() -> None:
    S = torch.linspace(8, 1, 8, dtype=torch.float64)
    assert choose_layer_rank(S, 8, 8, RankRule("rank", 3)) == 3  # 48 < 64
    assert choose_layer_rank(S, 8, 8, RankRule("rank", 4)) is None  # 64: no saving
    assert choose_layer_rank(S, 8, 8, RankRule("ratio", 1.0)) is None
    assert choose_layer_rank(S, 8, 100, RankRule("ratio", 0.5)) == 4  # 432 < 800
    with pytest.raises(ValueError):
        choose_layer_rank(S, 4, 8, RankRule("rank", 1))  # 8 values for a 4x8 layer


@pytest.mark.parametrize(
    ("kind", "value", "max_rank", "message"),
    [
        ("energy", 1.5, None, "--energy must be in (0, 1], got 1.5"),
        ("energy", 0.0, None, "--energy must be in (0, 1], got 0"),
        ("energy", float("nan"), None, "--energy must be in (0, 1], got nan"),
        ("ratio", -0.1, None, "--ratio must be in (0, 1], got -0.1"),
        ("ratio", 1.01, None, "--ratio must be in (0, 1], got 1.01"),
        ("sv_fro", 1.2, None, "--sv-fro must be in (0, 1], got 1.2"),
        ("sv_cumulative", 0.0, None, "--sv-cumulative must be in (0, 1], got 0"),
        ("sv_ratio", 0.0, None, "--sv-ratio must be a finite number > 0, got 0"),
        ("sv_ratio", -2.0, None, "--sv-ratio must be a finite number > 0, got -2"),
        ("sv_ratio", float("inf"), None, "--sv-ratio must be a finite number > 0, got inf"),
        ("rank", 0, None, "--rank must be a positive integer, got 0"),
        ("rank", 2.5, None, "--rank must be a positive integer, got 2.5"),
        ("energy", 0.9, 0, "--max-rank must be a positive integer, got 0"),
        (
            "fro",
            0.9,
            None,
            "unknown rank rule 'fro'; choose one of rank, ratio, energy, sv_ratio, sv_fro, sv_cumulative",
        ),
    ],
)
def test_invalid_rules_raise(kind: str, value: float, max_rank: int | None, message: str) -> None:
    with pytest.raises(InvalidOptionError) as ei:
        RankRule(kind, value, max_rank)
    assert ei.value.message == message
    assert ei.value.one_line() == message
    assert ei.value.exit_code == EXIT_ERROR


def test_valid_edges_accepted() -> None:
    for kind in ("ratio", "energy", "sv_fro", "sv_cumulative"):
        RankRule(kind, 1.0)
        RankRule(kind, 1e-9)
    RankRule("sv_ratio", 0.5)
    RankRule("rank", 1)
    RankRule("rank", 4.0)


# ---------------------------------------------------------------------------------------------------------
# Global budget
# ---------------------------------------------------------------------------------------------------------


def _options(layer: LayerSpectrum) -> list[tuple[int | None, int, float]]:
    """Every option, computed independently: ranks 1..min(m, n) (even those that save nothing) + dense."""
    s2 = layer.S.double().numpy() ** 2
    opts: list[tuple[int | None, int, float]] = [
        (k, k * (layer.m + layer.n), float(s2[k:].sum())) for k in range(1, min(layer.m, layer.n) + 1)
    ]
    opts.append((None, layer.m * layer.n, 0.0))
    return opts


def _all_combos(layers: list[LayerSpectrum]) -> tuple[np.ndarray, np.ndarray]:
    """Params and error of every combination of every layer's options (brute force)."""
    params, errs = np.zeros(1, dtype=np.int64), np.zeros(1)
    for layer in layers:
        opts = _options(layer)
        params = (params[:, None] + np.array([o[1] for o in opts])[None, :]).ravel()
        errs = (errs[:, None] + np.array([o[2] for o in opts])[None, :]).ravel()
    return params, errs


def _brute_force(layers: list[LayerSpectrum], budget: int) -> float:
    params, errs = _all_combos(layers)
    return float(errs[params <= budget].min())


def _cost(layers: list[LayerSpectrum], ranks: list[int | None]) -> tuple[int, float]:
    params, err = 0, 0.0
    for lay, k in zip(layers, ranks, strict=True):
        params += lay.m * lay.n if k is None else k * (lay.m + lay.n)
        err += 0.0 if k is None else float(sum(float(x) ** 2 for x in lay.S.tolist()[k:]))
    return params, err


def _hull_vertex_budgets(layers: list[LayerSpectrum]) -> list[int]:
    """Budgets the hull walk lands on exactly: min budget plus prefixes of all layers' lower-hull
    segments sorted by decreasing error removed per parameter (an independent hull computation)."""
    segs = []
    base = 0
    for lay in layers:
        pts = sorted({(p, e) for k, p, e in _options(lay) if k is None or p < lay.m * lay.n})
        base += pts[0][0]
        hull: list[tuple[int, float]] = []
        for p in pts:
            while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) <= (
                hull[-1][1] - hull[-2][1]
            ) * (p[0] - hull[-2][0]):
                hull.pop()
            hull.append(p)
        for a, b in itertools.pairwise(hull):
            if b[1] < a[1]:
                segs.append(((a[1] - b[1]) / (b[0] - a[0]), b[0] - a[0]))
    segs.sort(key=lambda g: -g[0])
    gains = [g for g, _ in segs]
    if len(set(gains)) != len(gains):
        return []  # ties make the walk's order ambiguous; skip such instances
    out = [base]
    for _, cost in segs:
        out.append(out[-1] + cost)
    return out


def _uniform_ratio_best(layers: list[LayerSpectrum], budget: int) -> float:
    """The best single --ratio for all layers (rounded half up, break-even applied) that fits."""
    best = math.inf
    for r in {k / min(lay.m, lay.n) for lay in layers for k in range(1, min(lay.m, lay.n) + 1)}:
        ranks: list[int | None] = []
        for lay in layers:
            k = max(1, math.floor(r * min(lay.m, lay.n) + 0.5 + 1e-9))
            ranks.append(k if k * (lay.m + lay.n) < lay.m * lay.n else None)
        params, err = _cost(layers, ranks)
        if params <= budget:
            best = min(best, err)
    return best


def _random_instance(rng: np.random.Generator) -> list[LayerSpectrum]:
    layers = []
    for i in range(int(rng.integers(2, 4))):
        m, n = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        r = min(m, n)
        kind = int(rng.integers(0, 4))
        if kind == 0:  # flat-ish
            s = rng.uniform(0, 1, r)
        elif kind == 1:  # geometric decay
            s = np.exp(-rng.uniform(0.1, 2.0) * np.arange(r)) * rng.uniform(0.5, 3)
        elif kind == 2:  # heavy-tailed
            s = rng.exponential(1.0, r) ** 2
        else:  # rank-deficient
            s = rng.uniform(0, 1, r)
            s[int(rng.integers(1, r)) :] = 0
        layers.append(LayerSpectrum(f"layer{i}", m, n, torch.tensor(np.sort(s)[::-1].copy())))
    return layers


def test_crafted_instance_where_plain_greedy_fails() -> None:
    """By hand. A 4×4, S = [1, .5, .5, .5]: rank 1 costs 8 and leaves 0.75; dense 16 and 0.
    B 6×6, S = [3, 1, 1, 1, 1, 1]: rank 1 (12, 5), rank 2 (24, 4), dense (36, 0); the hull skips rank 2.
    Budget 44 = 20 (both at rank 1) + 24 (B's hull step to dense): the walk lands on it exactly.
    Best: A rank 1, B dense, error 0.75. Plain step greedy takes A's step (0.75/8 beats 1/12), then B's
    step to rank 2, and cannot afford B's dense step: error 4."""
    layers = [LayerSpectrum("A", 4, 4, _s(1, 0.5, 0.5, 0.5)), LayerSpectrum("B", 6, 6, _s(3, 1, 1, 1, 1, 1))]
    assert min_budget(layers) == 20
    plan = plan_budget(layers, 44)
    assert list(plan.ranks) == [1, None]
    assert plan.params == 44
    assert plan.error == pytest.approx(0.75)
    assert plan.lower_bound == pytest.approx(0.75)  # certified optimal: landed on hull vertices
    assert allocate_budget(layers, 44) == [1, None]
    assert allocate_budget_exact(layers, 44) == [1, None]
    assert _brute_force(layers, 44) == pytest.approx(0.75)
    # more budget: everything dense; less than the minimum: refused with the minimum named
    assert allocate_budget(layers, 52) == [None, None]
    assert allocate_budget(layers, 10_000) == [None, None]
    with pytest.raises(InvalidOptionError) as ei:
        allocate_budget(layers, 19)
    assert ei.value.message == (
        "--budget allows 19 parameters but these 2 layers need at least 20 (every layer at rank 1); raise --budget"
    )
    with pytest.raises(InvalidOptionError):
        allocate_budget_exact(layers, 19)


def test_layers_without_a_saving_rank_stay_dense() -> None:
    layers = [
        LayerSpectrum("tiny", 2, 2, _s(2, 1)),
        LayerSpectrum("row", 1, 9, _s(3)),
        LayerSpectrum("big", 8, 8, _s(*range(8, 0, -1))),
    ]
    assert min_budget(layers) == 4 + 9 + 16
    assert allocate_budget(layers, 29) == [None, None, 1]
    assert allocate_budget_exact(layers, 29) == [None, None, 1]
    assert allocate_budget([], 0) == []


def test_short_spectrum_counts_missing_values_as_zero() -> None:
    # an adapter-like layer of rank 2 in a 6x6 (S = [3, 2], padded): rank 1 leaves 4, rank 2 leaves 0;
    # b: rank 1 leaves 5, rank 2 leaves 4. Budget for one rank-2 and one rank-1 layer: (2, 1) gives 5,
    # (1, 2) gives 8.
    layers = [LayerSpectrum("a", 6, 6, _s(3, 2)), LayerSpectrum("b", 6, 6, _s(2, 1, 1, 1, 1, 1))]
    for plan in (plan_budget(layers, 36), plan_budget(layers, 36, exact=True)):
        assert plan.ranks == (2, 1)
        assert plan.error == pytest.approx(5.0)


def test_budget_from_fraction() -> None:
    layers = [LayerSpectrum("a", 10, 10, torch.ones(10)), LayerSpectrum("b", 10, 20, torch.ones(10))]
    assert budget_from_fraction(layers, 1.0) == 300
    assert budget_from_fraction(layers, 0.5) == 150
    assert budget_from_fraction([LayerSpectrum("c", 10, 10, torch.ones(10))], 0.29) == 29  # not 28
    assert budget_from_fraction(layers, 0.001) == 0
    for bad, shown in ((0.0, "0"), (1.5, "1.5"), (-1.0, "-1"), (float("nan"), "nan")):
        with pytest.raises(InvalidOptionError) as ei:
            budget_from_fraction(layers, bad)
        assert ei.value.message == f"--budget must be in (0, 1], got {shown}"


def test_exact_state_limit() -> None:
    layers = [LayerSpectrum(f"l{i}", 30, 30, torch.linspace(30, 1, 30)) for i in range(4)]
    with pytest.raises(InvalidOptionError, match="states"):
        allocate_budget_exact(layers, 2000, max_states=50)


def _check_instances(seed: int, count: int) -> tuple[int, int, float, float]:
    """Run every budget check on ``count`` random instances; return (checks, greedy suboptimal,
    worst gap as a share of the instance's total squared norm, worst gap relative to the optimum)."""
    rng = np.random.default_rng(seed)
    suboptimal, worst_share, worst_rel, checks = 0, 0.0, 0.0, 0
    for _ in range(count):
        layers = _random_instance(rng)
        total = sum(float((lay.S.double() ** 2).sum()) for lay in layers)
        tol = 1e-9 * max(1.0, total)
        combo_params, combo_errs = _all_combos(layers)
        choices = [R._layer_choices(lay) for lay in layers]
        hulls = [R._lower_hull(c.params, c.errors) for c in choices]
        lo, hi = min_budget(layers), sum(lay.m * lay.n for lay in layers)
        vertex_budgets = _hull_vertex_budgets(layers)
        for budget in [int(b) for b in rng.integers(lo, hi + 1, size=3)] + vertex_budgets:
            checks += 1
            opt = float(combo_errs[combo_params <= budget].min())

            exact = plan_budget(layers, budget, exact=True)
            assert exact.error == pytest.approx(opt, abs=tol)
            assert _cost(layers, list(exact.ranks)) == (exact.params, pytest.approx(exact.error, abs=tol))
            assert exact.params <= budget

            plan = plan_budget(layers, budget)
            params, err = _cost(layers, list(plan.ranks))
            assert params == plan.params <= budget
            assert err == pytest.approx(plan.error, abs=tol)
            assert plan.lower_bound - tol <= opt <= plan.error + tol
            # within one hull step (of the critical layer) of the optimum
            walk = R._hull_greedy(choices, hulls, budget)
            if walk.critical is None:
                assert plan.error <= opt + tol
            else:
                li, a, b = walk.critical
                assert plan.error - opt < choices[li].errors[a] - choices[li].errors[b] + tol
            if budget in vertex_budgets:  # optimal where the hull walk lands exactly
                assert plan.error <= opt + tol, (budget, vertex_budgets)
            assert plan.error <= _uniform_ratio_best(layers, budget) + tol
            if plan.error > opt + tol:
                suboptimal += 1
                worst_share = max(worst_share, (plan.error - opt) / total)
                worst_rel = max(worst_rel, (plan.error - opt) / opt)
    return checks, suboptimal, worst_share, worst_rel


def test_budget_against_brute_force() -> None:
    """300 random instances (2-3 layers, 3..7 × 3..7, four spectrum families), 3 random budgets each
    plus every budget the hull walk lands on exactly, each against brute-force enumeration.

    Asserted on every one: the exact DP equals brute force; the greedy is feasible, its reported
    params and error are its allocation's, ``lower_bound <= optimum <= greedy``, it exceeds the
    optimum by less than the error reduction of the first hull segment that did not fit, it is
    optimal at every budget the hull walk lands on exactly, and it never loses to the best uniform
    --ratio that fits.

    Measured here (seed 0, the 900 random budgets; at the hull-walk budgets it is always optimal):
    greedy suboptimal in 3 (0.33 %), by at most 0.29 % of the instance's total squared norm (5.6 % of
    the optimum's error). On 3,000 instances from the same generator (seed 1, 9,000 random budgets):
    suboptimal in 27 (0.30 %), worst 4.3 % of the total squared norm (34 % of the optimum, which was
    small there). For comparison, on those 9,000: the hull walk alone (no retries) suboptimal in 357,
    worst 12.3 %; plain step-by-step greedy in 407, worst 29.9 %. The LP ``lower_bound`` is loose on
    instances this small (the plan sits above it in 7,067 of 9,000, by up to 43 %).
    """
    checks, suboptimal, worst_share, _ = _check_instances(seed=0, count=300)
    assert checks > 900
    assert suboptimal <= 5, suboptimal  # regression guards; the measured figures are in the docstring
    assert worst_share <= 0.01, worst_share
