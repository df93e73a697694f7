"""Data-aware factorization: statistics from calibration inputs, and the SVD they weight.

Methods (GUIDE §4):
- ``svd-llm`` (Wang et al. 2024): whiten with the Cholesky factor S of the input second moments,
  XᵀX = S·Sᵀ (fp64, damped). SVD of W·S = U Σ Vᵀ; keep k: U_k·√Σ_k and √Σ_k·V_kᵀ·S⁻¹. Then
  ‖(W − Ŵ)X‖_F² = Σ_{i>k} σ_i²: the dropped energy of W·S is exactly the output error.
- ``asvd`` (Yuan et al. 2023): scale input columns by s^α (s = mean |x| per input feature), SVD,
  undo the scaling.
- ``fwsvd`` (Hsu et al. 2022): weight output rows by √(Σ (∂L/∂W_ij)²) summed over the row and
  the calibration set (Fisher information), SVD, undo.
- ``svd``: plain.

Statistics are collected with forward hooks, for groups of layers whose statistics fit a memory
budget, one pass over the calibration data per group: memory stays bounded whatever the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorasurgeon.data import Dataset
from lorasurgeon.errors import FormatError, InvalidOptionError
from lorasurgeon.nn.layers import apply_factorization
from lorasurgeon.nn.models import LoadedModel, conv_groups, model_outputs
from lorasurgeon.ops import svd

METHODS = ("svd", "asvd", "svd-llm", "fwsvd")
ProgressFn = Callable[[int, int, str], None]


@dataclass
class LayerStats:
    """What one layer's method needs: a column transform (Cholesky factor or diagonal), a row
    weighting, the damping used and the number of calibration rows (tokens or patches) seen."""

    col_chol: torch.Tensor | None = None  # (n, n) lower triangular, fp64
    col_diag: torch.Tensor | None = None  # (n,)
    row_diag: torch.Tensor | None = None  # (m,)
    damping: float = 0.0
    rows: int = 0
    note: str = ""


_current_mask: list[torch.Tensor | None] = [None]


def _layer_inputs(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The matrix X (rows × n) the layer's weight multiplies: real (unpadded) tokens for a Linear,
    unfolded patches for a Conv2d (channel-major, matching weight.reshape(out, -1))."""
    if isinstance(mod, nn.Conv2d):
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, C·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    mask = _current_mask[0]
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]  # padding positions are not data: leave them out of the statistics
    return x.reshape(-1, x.shape[-1])


def _run(lm: LoadedModel, ds: Dataset, batch_size: int, device: str) -> None:
    try:
        for inputs, _labels in ds.batches(batch_size):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            _current_mask[0] = inputs.get("attention_mask")
            with torch.no_grad():
                model_outputs(lm, inputs)
    finally:
        _current_mask[0] = None


def collect_stats(
    lm: LoadedModel,
    ds: Dataset,
    modules: Sequence[str],
    method: str,
    *,
    batch_size: int = 16,
    alpha: float = 0.5,
    damping: float = 1e-3,
    memory_bytes: int = 1 << 30,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> dict[str, LayerStats]:
    """Run the model on the calibration set and collect each layer's statistics.

    Args:
        modules: module names (Linear or groups-1 Conv2d) of ``lm.model``.
        method: asvd | svd-llm | fwsvd.
        alpha: asvd's exponent on the mean absolute activation.
        damping: svd-llm's ridge, relative to the mean diagonal of XᵀX; raised ×10 (up to 1) when
            the Cholesky factorization fails, e.g. when there are fewer rows than inputs.
        memory_bytes: the Gram matrices of one pass fit this budget (layers are grouped).

    Raises:
        InvalidOptionError: unknown method; fwsvd on an encoder without labels.
        FormatError: a module that is not Linear / Conv2d.
    """
    model = lm.model.eval()
    mods = {}
    for name in modules:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"module {name!r} of the checkpoint is not in the model") from None
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise FormatError(f"module {name!r} is a {type(m).__name__}; calibrated factorization needs Linear or Conv2d")
        mods[name] = m
    if method == "fwsvd":
        return _fisher_rows(lm, ds, mods, batch_size, device, progress)
    if method not in ("asvd", "svd-llm"):
        raise InvalidOptionError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    width = {n: (m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)) for n, m in mods.items()}
    groups: list[list[str]] = [[]]
    used = 0
    for n in modules:
        need = width[n] ** 2 * 8 if method == "svd-llm" else width[n] * 8
        if groups[-1] and used + need > memory_bytes:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += need
    out: dict[str, LayerStats] = {}
    for gi, group in enumerate(groups):
        if progress:
            progress(gi, len(groups), f"calibration pass {gi + 1}/{len(groups)}")
        acc: dict[str, torch.Tensor] = {n: torch.zeros((width[n], width[n]) if method == "svd-llm" else (width[n],),
                                                        dtype=torch.float64) for n in group}
        rows: dict[str, int] = dict.fromkeys(group, 0)

        def hook(name: str, acc: dict[str, torch.Tensor] = acc, rows: dict[str, int] = rows) -> Callable[..., None]:
            def fn(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
                X = _layer_inputs(mod, args[0].detach()).to("cpu", torch.float64)
                if method == "svd-llm":
                    acc[name].addmm_(X.T, X)
                else:
                    acc[name].add_(X.abs().sum(0))
                rows[name] += X.shape[0]
            return fn

        handles = [mods[n].register_forward_hook(hook(n)) for n in group]
        try:
            _run(lm, ds, batch_size, device)
        finally:
            for h in handles:
                h.remove()
        for n in group:
            if method == "asvd":
                s = (acc[n] / max(rows[n], 1)).clamp_min(1e-8) ** alpha
                out[n] = LayerStats(col_diag=s, rows=rows[n])
            else:
                out[n] = _cholesky(acc[n], damping, rows[n])
                if out[n].note:
                    out[n].note = f"{n}: {out[n].note}"
            del acc[n]
    if progress:
        progress(len(groups), len(groups), "")
    return out


def _cholesky(G: torch.Tensor, damping: float, rows: int) -> LayerStats:
    """Lower Cholesky factor of G + λ·mean(diag G)·I, λ raised ×10 until it succeeds."""
    n = G.shape[0]
    scale = float(G.diagonal().mean()) if n else 0.0
    if scale <= 0:
        return LayerStats(col_chol=torch.eye(n, dtype=torch.float64), damping=float("inf"), rows=rows,
                          note="no activation: plain SVD")
    lam = damping
    note = "" if rows >= n else f"only {rows} calibration rows for {n} inputs: damped fallback"
    while lam <= 1.0:
        L, info = torch.linalg.cholesky_ex(G + (lam * scale) * torch.eye(n, dtype=G.dtype))
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return LayerStats(col_chol=L, damping=lam, rows=rows, note=note)
        lam = lam * 10 if lam > 0 else 1e-8
    return LayerStats(col_chol=torch.eye(n, dtype=torch.float64), damping=float("inf"), rows=rows,
                      note="Cholesky failed even with damping 1: plain SVD")


def _fisher_rows(lm: LoadedModel, ds: Dataset, mods: dict[str, nn.Module], batch_size: int, device: str,
                 progress: ProgressFn | None) -> dict[str, LayerStats]:
    """Summed squared gradients of the task loss per output row (FWSVD's Fisher weights)."""
    model = lm.model
    loss_fn = _task_loss(lm, ds, batch_size, device)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    fisher = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in mods.items()}
    try:
        for b, (inputs, labels) in enumerate(ds.batches(batch_size)):
            if progress:
                progress(b, math.ceil(len(ds) / batch_size), "fisher")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            out = model_outputs(lm, inputs)
            loss_fn(out, None if labels is None else labels.to(device)).backward()
            for n, m in mods.items():
                if m.weight.grad is None:  # the loss does not reach this layer (e.g. an unused pooler)
                    continue
                g = m.weight.grad.detach().to("cpu", torch.float64)
                fisher[n] += g.pow(2).reshape(g.shape[0], -1).sum(1)
                m.weight.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    out: dict[str, LayerStats] = {}
    for n, f in fisher.items():
        if not float(f.max()) > 0:  # no gradient at all: every row weighs the same, i.e. plain SVD
            out[n] = LayerStats(row_diag=torch.ones_like(f), rows=len(ds),
                                note="the task loss does not depend on this layer: plain SVD")
        else:
            out[n] = LayerStats(row_diag=f.sqrt().clamp_min(1e-12 * float(f.sqrt().max())), rows=len(ds))
    return out


def _task_loss(lm: LoadedModel, ds: Dataset, batch_size: int, device: str
               ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Cross-entropy on the labels (or, unlabelled, on the model's own predictions); for an
    encoder without a head, on a ridge-regression probe fitted to the calibration embeddings."""
    if lm.has_head:
        def ce(out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            return F.cross_entropy(out, out.argmax(-1).detach() if y is None else y, reduction="sum")
        return ce
    if ds.labels is None:
        raise InvalidOptionError("--method fwsvd on an encoder without a head needs a labelled calibration set")
    with torch.no_grad():
        E = torch.cat([model_outputs(lm, {k: v.to(device) for k, v in i.items()}).double().cpu() for i, _ in ds.batches(batch_size)])
    Y = F.one_hot(ds.labels, int(ds.labels.max()) + 1).double()
    E1 = torch.cat([E, torch.ones(E.shape[0], 1, dtype=E.dtype)], 1)
    P = torch.linalg.solve(E1.T @ E1 + 1e-3 * torch.eye(E1.shape[1], dtype=E.dtype), E1.T @ Y).float().to(device)

    def probe(out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        logits = torch.cat([out, torch.ones(out.shape[0], 1, device=out.device, dtype=out.dtype)], 1) @ P
        return F.cross_entropy(logits, y, reduction="sum")
    return probe


# --------------------------------------------------------------------------- weighted SVD
def transformed(W: torch.Tensor, st: LayerStats | None) -> torch.Tensor:
    """The matrix whose truncation error is the method's error: W·S, W·diag(s), diag(r)·W (fp64)."""
    M = svd.as_matrix(W).to(torch.float64)
    if st is None:
        return M
    if st.col_chol is not None:
        M = M @ st.col_chol
    if st.col_diag is not None:
        M = M * st.col_diag
    if st.row_diag is not None:
        M = st.row_diag[:, None] * M
    return M


def factorize_calibrated(W: torch.Tensor, st: LayerStats | None, k: int, *, method: str = "exact", seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Balanced factors of the method's best rank-k approximation, cast to W's dtype once.

    Returns:
        (u (m×k), v (k×n), singular values of the transformed matrix (top k), the relative
        transformed error sqrt(dropped energy / total energy) — for svd-llm, the relative error of
        the layer's output on the calibration inputs).
    """
    M = transformed(W, st)
    res = svd.truncated_svd(M, k, method=method, fp64=True, seed=seed)
    root = res.S.sqrt()
    u = res.U * root
    v = root[:, None] * res.Vh
    if st is not None and st.col_chol is not None:
        # v·S⁻¹ = (S⁻ᵀ·vᵀ)ᵀ: one triangular solve, no explicit inverse.
        v = torch.linalg.solve_triangular(st.col_chol.T, v.T, upper=True).T
    if st is not None and st.col_diag is not None:
        v = v / st.col_diag
    if st is not None and st.row_diag is not None:
        u = u / st.row_diag[:, None]
    total = float(M.pow(2).sum())
    kept = float(res.S.pow(2).sum())
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return u.to(W.dtype), v.to(W.dtype), res.S, rel


# --------------------------------------------------------------------------- sequential svd-llm
class _StopForward(Exception):
    """Raised by a hook once the modules of interest have run: the rest of the forward is not needed."""


def _forward_groups(lm: LoadedModel, ds: Dataset, modules: Sequence[str], device: str) -> list[list[str]]:
    """``modules`` in the order the forward pass first calls them, grouped by shared input (the
    query, key and value projections of one attention block read the same tensor). Modules the
    forward never calls are left out."""
    model = lm.model.eval()
    # the input tensors themselves are kept (not their ids), so that no address is reused
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in modules]
    try:
        for inputs, _ in ds.batches(1):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.no_grad():
                model_outputs(lm, inputs)
            break
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last: torch.Tensor | None = None
    for name, x in seen:
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def sequential_svd_llm(
    lm: LoadedModel, ds: Dataset, ranks: dict[str, int], *, batch_size: int = 16, damping: float = 1e-3,
    svd_method: str = "exact", seed: int = 0, device: str = "cpu", progress: ProgressFn | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, LayerStats]]:
    """SVD-LLM with each layer fitted to the inputs it will really see: those of the model whose
    earlier layers are already factorized (as GPTQ quantizes sequentially).

    Layers go in forward order, a group of layers sharing one input at a time. For a group, the
    original model gives X and the partly factorized student gives X̂ at the same positions
    (real tokens only); with λ = damping·mean(diag X̂ᵀX̂), Â = X̂ᵀX̂ + λI = S Sᵀ and C = X̂ᵀX (fp64),
    each layer's rank-k W' minimises the error against the original layer's output plus a ridge
    towards the original weight,

        ‖X Wᵀ − X̂ W'ᵀ‖² + λ‖W' − W‖²  is minimal over rank k at  W' = trunc_k(W* S) S⁻¹,
        W* = W (C + λI)ᵀ Â⁻¹,

    because this is least squares with the design [X̂; √λ I], whose Gram matrix is Â, and the
    residual of the unconstrained solution W* is orthogonal to every candidate. The ridge keeps W'
    near W in directions the calibration inputs barely reach (towards 0 it would drop them), and
    the first group, which sees X̂ = X, gets exactly plain svd-llm's factors. The student uses W'
    for the groups after it. Cost: one pass over the calibration set per group, each pass
    stopped once the group's input is known, and a second copy of the model in memory.

    Args:
        ranks: module -> rank, for the modules to factorize (Linear / groups-1 Conv2d).
        svd_method, seed: the truncated SVD of W*·S (``svd.truncated_svd``), as for plain svd-llm.

    Returns:
        module -> (u (m×k), v (k×n) fp64 balanced factors, relative output error
        ‖X Wᵀ − X̂ W'ᵀ‖ / ‖X Wᵀ‖ on the calibration set, the LayerStats used). Modules the forward
        never reaches are absent (the caller factorizes them without calibration).
    """
    f64 = torch.float64
    teacher = lm.model.eval()
    student = copy.deepcopy(teacher).eval()
    lo = copy.copy(lm)
    lo.model = student
    groups = _forward_groups(lm, ds, list(ranks), device)
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float, LayerStats]] = {}
    for gi, group in enumerate(groups):
        if progress:
            progress(gi, len(groups), f"sequential svd-llm {group[0]}")
        first = teacher.get_submodule(group[0])
        n_in = first.in_features if isinstance(first, nn.Linear) else first.in_channels * math.prod(first.kernel_size)
        A = torch.zeros(n_in, n_in, dtype=f64)
        C = torch.zeros(n_in, n_in, dtype=f64)
        G = torch.zeros(n_in, n_in, dtype=f64)
        got: dict[str, torch.Tensor] = {}
        rows = 0

        def grab(key: str, got: dict[str, torch.Tensor] = got) -> Callable[..., None]:
            def fn(layer: nn.Module, args: tuple[Any, ...]) -> None:
                got[key] = _layer_inputs(layer, args[0].detach()).to("cpu", f64)
                raise _StopForward
            return fn

        handles = [teacher.get_submodule(group[0]).register_forward_pre_hook(grab("x")),
                   student.get_submodule(group[0]).register_forward_pre_hook(grab("xh"))]
        try:
            for inputs, _ in ds.batches(batch_size):
                inputs = {k: v.to(device) for k, v in inputs.items()}
                _current_mask[0] = inputs.get("attention_mask")
                for m in (lm, lo):
                    try:
                        with torch.no_grad():
                            model_outputs(m, inputs)
                    except _StopForward:
                        pass
                X, Xh = got.pop("x"), got.pop("xh")
                A.addmm_(Xh.T, Xh)
                C.addmm_(Xh.T, X)
                G.addmm_(X.T, X)
                rows += X.shape[0]
        finally:
            _current_mask[0] = None
            for h in handles:
                h.remove()
        st = _cholesky(A, damping, rows)
        same = torch.equal(A, C)
        L = st.col_chol
        assert L is not None
        for name in group:
            mod = teacher.get_submodule(name)
            W = svd.as_matrix(mod.weight.detach()).to("cpu", f64)
            if same:  # nothing upstream changed (X̂ = X bitwise): W* = W, plain svd-llm
                W_star = W
            elif math.isfinite(st.damping):
                # W* = W (C + λI)ᵀ Â⁻¹: the ridge pulls towards W (not 0), so W* = W where X̂ = X
                lam = st.damping * float(A.diagonal().mean())
                W_star = torch.cholesky_solve((C + lam * torch.eye(n_in, dtype=f64)) @ W.T, L).T
            else:  # no activation reached the layer: nothing to fit, plain SVD of W
                W_star = W
            k = ranks[name]
            u, v, _S, _rel = factorize_calibrated(W_star, st, k, method=svd_method, seed=seed)
            u64, v64 = u.to(f64), v.to(f64)
            Wp = u64 @ v64
            # ‖X Wᵀ − X̂ W'ᵀ‖² = tr(W G Wᵀ) − 2 tr(W Cᵀ W'ᵀ) + tr(W' A W'ᵀ), all from the moments
            ref = float(torch.einsum("ij,jk,ik->", W, G, W))
            err2 = ref - 2 * float(torch.einsum("ij,kj,ik->", W, C, Wp)) + float(torch.einsum("ij,jk,ik->", Wp, A, Wp))
            rel = math.sqrt(max(err2, 0.0) / ref) if ref > 0 else 0.0
            # fp64 factors: the caller casts once to the checkpoint's dtype. One LayerStats per
            # layer (the group shares its Cholesky factor), its note naming the layer.
            own = dataclasses.replace(st, note=f"{name}: {st.note}" if st.note else "")
            out[name] = (u, v, rel, own)
        factorized_copy(student, {n: out[n][:2] for n in group}, in_place=True)  # the next groups see W'
    if progress:
        progress(len(groups), len(groups), "")
    return out


# --------------------------------------------------------------------------- fidelity
def factorized_copy(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                    in_place: bool = False) -> nn.Module:
    """``model`` with the given layers replaced by their low-rank factors (u (m×k), v (k×n), cast to
    the model's dtype), biases kept: a copy, or ``model`` itself with ``in_place``."""
    layers = {}
    origs = {n: model.get_submodule(n) for n in factors}
    for n, (u, _v) in factors.items():
        layers[n] = {"kind": "conv2d" if isinstance(origs[n], nn.Conv2d) else "linear", "rank": int(u.shape[1])}
    low = apply_factorization(model, layers, copy_model=not in_place)
    for n, (u, v) in factors.items():
        mod = low.get_submodule(n)
        with torch.no_grad():
            mod.weight_u.copy_(u.reshape(mod.weight_u.shape))
            mod.weight_v.copy_(v.reshape(mod.weight_v.shape))
            if origs[n].bias is not None:
                mod.bias.copy_(origs[n].bias)
    return low.eval()


@torch.no_grad()
def fidelity(lm: LoadedModel, low: nn.Module, ds: Dataset, batch_size: int = 32, device: str = "cpu") -> dict[str, float]:
    """Mean cosine and mean relative error of the outputs (embeddings or logits) on ``ds``."""
    lo = copy.copy(lm)
    lo.model = low
    cos, err, n = 0.0, 0.0, 0
    for inputs, _ in ds.batches(batch_size):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        a = model_outputs(lm, inputs).double()
        b = model_outputs(lo, inputs).double()
        cos += float(F.cosine_similarity(a, b, dim=-1).sum())
        err += float(((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).sum())
        n += a.shape[0]
    return {"mean_cosine": round(cos / max(n, 1), 6), "output_error": round(err / max(n, 1), 6)}


# --------------------------------------------------------------------------- a session
@dataclass
class CalibrationOptions:
    """``factorize --calibration DATA --method M`` and the fidelity gate."""

    data: str
    method: str = "svd-llm"
    samples: int = 128
    heldout: int = 64
    alpha: float = 0.5
    damping: float = 1e-3
    arch: str | None = None
    batch_size: int = 16
    max_length: int = 128
    text_column: str = "text"
    label_column: str | None = "label"
    image_size: int | None = None
    min_cosine: float | None = None
    max_output_error: float | None = None
    memory_bytes: int = 1 << 30
    seed: int = 0
    sequential: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sequential and self.method != "svd-llm":
            raise InvalidOptionError(f"--sequential needs --method svd-llm, got {self.method!r}")
        if self.samples < 1 or self.heldout < 0:
            raise InvalidOptionError("--calibration-samples must be >= 1 and --heldout-samples >= 0")
        if self.min_cosine is not None and not (-1 <= self.min_cosine <= 1):
            raise InvalidOptionError(f"--min-cosine must be in [-1, 1], got {self.min_cosine:g}")
        if self.max_output_error is not None and not (0 <= self.max_output_error < float("inf")):
            raise InvalidOptionError(f"--max-output-error must be a number >= 0, got {self.max_output_error:g}")
        if (self.min_cosine is not None or self.max_output_error is not None) and self.heldout < 1:
            raise InvalidOptionError("the fidelity gate needs held-out samples (--heldout-samples >= 1)")
        if not (0 <= self.damping <= 1):
            raise InvalidOptionError(f"--damping must be in [0, 1], got {self.damping:g}")

    def to_options(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("method", "samples", "heldout", "alpha", "damping", "arch", "max_length",
                                          "text_column", "label_column", "image_size", "min_cosine", "max_output_error", "seed")}
        if self.sequential:  # only when set, so that earlier outputs' provenance is unchanged
            d["sequential"] = True
        d["data"] = self.data if not Path(self.data).exists() else Path(self.data).name
        return d


class CalibrationSession:
    """The loaded model, the calibration and held-out splits, and each layer's statistics."""

    def __init__(self, lm: LoadedModel, calib: Dataset, heldout: Dataset | None, opts: CalibrationOptions) -> None:
        self.lm, self.calib, self.heldout, self.opts = lm, calib, heldout, opts
        self.stats: dict[str, LayerStats] = {}
        self.fitted: dict[str, tuple[torch.Tensor, torch.Tensor, float, LayerStats]] = {}
        self.conv_groups = conv_groups(lm.model)

    @classmethod
    def prepare(cls, model_path: Path, opts: CalibrationOptions) -> CalibrationSession:
        from lorasurgeon.data import load_dataset
        from lorasurgeon.nn.models import load_model, prepare_inputs

        opts.validate()
        lm = load_model(model_path, arch=opts.arch)
        ds = load_dataset(opts.data, text_column=opts.text_column, label_column=opts.label_column, image_size=opts.image_size)
        ds = prepare_inputs(lm, ds, opts.data, opts.max_length, what="calibration set")
        # Calibration samples come from the END of the seeded permutation that data.split uses
        # (test first, then validation, then train), the held-out gate's just before them: with the
        # same data and --seed, attach/distill's validation and test splits never contain a
        # calibration sample. (Drawn from the front, distill --seed 0 validated on the very
        # articles svd-llm was fitted to: MiniLM at 0.25, validation cosine 0.891 against 0.742
        # on held-out test articles.)
        n = len(ds)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed))
        n_cal = min(opts.samples, n)
        n_held = min(opts.heldout, n - n_cal)
        if (opts.min_cosine is not None or opts.max_output_error is not None) and n_held < 1:
            raise InvalidOptionError(f"the calibration set has {n} examples: none left for the held-out gate")
        cal = perm[n - n_cal:]
        held = perm[n - n_cal - n_held: n - n_cal]
        return cls(lm, ds.subset(cal), ds.subset(held) if n_held else None, opts)

    def collect(self, modules: Sequence[str], progress: ProgressFn | None = None) -> None:
        if self.opts.method != "svd":
            self.stats = collect_stats(self.lm, self.calib, modules, self.opts.method, batch_size=self.opts.batch_size,
                                       alpha=self.opts.alpha, damping=self.opts.damping,
                                       memory_bytes=self.opts.memory_bytes, progress=progress)

    def transformed(self, module: str, w: torch.Tensor) -> torch.Tensor:
        return transformed(w, self.stats.get(module))

    def fit_sequential(self, ranks: dict[str, int], svd_method: str, seed: int, progress: ProgressFn | None = None) -> None:
        """With ``sequential``: every layer's factors by ``sequential_svd_llm`` (used by ``factorize``)."""
        if self.opts.sequential:
            self.fitted = sequential_svd_llm(self.lm, self.calib, ranks, batch_size=self.opts.batch_size,
                                             damping=self.opts.damping, svd_method="exact" if svd_method == "exact" else "auto",
                                             seed=seed, progress=progress)
            for n, (_u, _v, _rel, st) in self.fitted.items():  # the summary reports their damping and notes
                self.stats[n] = st

    def factorize(self, w: torch.Tensor, k: int, c: Any, svd_method: str, fp64: bool, seed: int
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
        """Factors shaped for the file (conv: out×k×1×1 and k×in×kh×kw) and the layer report."""
        from lorasurgeon.factorize import LayerReport, factorize_weight

        st = self.stats.get(c.module)
        if c.module in self.fitted:
            u, v, out_rel, st = self.fitted.pop(c.module)
            u, v = u.to(w.dtype), v.to(w.dtype)
        elif st is None:
            u, v, rep = factorize_weight(w, k, c, svd_method, fp64, seed)
            return (u, v), rep
        else:
            u, v, _S, out_rel = factorize_calibrated(w, st, k, method="exact" if svd_method == "exact" else "auto", seed=seed)
        W = svd.as_matrix(w).double()
        rel_w = float((W - u.double() @ v.double()).norm() / W.norm()) if float(W.norm()) > 0 else 0.0
        shape = tuple(w.shape)
        if len(shape) == 4:
            u, v = u.reshape(shape[0], k, 1, 1), v.reshape(k, *shape[1:])
        m, n = W.shape
        rep = LayerReport(c.module, c.kind, list(shape), k, "factorized", m * n, k * (m + n), round(rel_w, 6),
                          round(1 - out_rel**2, 6))
        if self.opts.method == "svd-llm":
            rep.output_error = round(out_rel, 6)
        else:
            rep.weighted_error = round(out_rel, 6)
        return (u.contiguous(), v.contiguous()), rep

    def gate(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Held-out fidelity of the factorized model; raises VerificationError below the gate."""
        from lorasurgeon.errors import VerificationError

        if self.heldout is None:
            return {}
        low = factorized_copy(self.lm.model, {n: (u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)) for n, (u, v) in factors.items()})
        fid = fidelity(self.lm, low, self.heldout, self.opts.batch_size * 2)
        fid["heldout_samples"] = len(self.heldout)
        o = self.opts
        if o.min_cosine is not None and fid["mean_cosine"] < o.min_cosine:
            raise VerificationError(f"held-out mean cosine {fid['mean_cosine']:.4f} is below --min-cosine {o.min_cosine:g}; nothing written")
        if o.max_output_error is not None and fid["output_error"] > o.max_output_error:
            raise VerificationError(f"held-out output error {fid['output_error']:.4f} is above --max-output-error {o.max_output_error:g}; nothing written")
        return fid

    def summary(self) -> dict[str, Any]:
        damp = [s.damping for s in self.stats.values() if s.col_chol is not None]
        notes = sorted({s.note for s in self.stats.values() if s.note})
        return {"method": self.opts.method, "sequential": self.opts.sequential, "samples": len(self.calib), "heldout": 0 if self.heldout is None else len(self.heldout),
                "damping_max": max(damp) if damp else None, "notes": notes}
