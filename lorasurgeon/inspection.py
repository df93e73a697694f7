"""``inspect``: what is in a checkpoint or adapter, computed without loading it whole."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._args import one_or_many
from lorasurgeon._finite import json_safe
from lorasurgeon.errors import (
    FormatError,
    InputNotFoundError,
    InvalidOptionError,
    LorasurgeonError,
    MatchError,
)
from lorasurgeon.io.adapters import (
    PEFT_PREFIX,
    PEFT_VARIANT_NAMES,
    Adapter,
    adapter_kind,
    detect_layout,
    is_kohya_stem,
    kohya_stems,
    peft_saved_name,
    read_adapter,
)
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.nn.targeting import matches, select
from lorasurgeon.ops import svd

SCHEMA = "lorasurgeon.inspect/1"
ProgressFn = Callable[[int, int, str], None]

KIND_NAMES = {
    "checkpoint": "plain checkpoint",
    "model-folder": "Hugging Face model folder",
    "peft": "PEFT LoRA adapter",
    "kohya": "kohya / LyCORIS LoCon LoRA",
    "diffusers": "diffusers LoRA",
    "diffusers-legacy": "diffusers LoRA (legacy attention-processor layout)",
    "factorized": "lorasurgeon factorized checkpoint",
}


@dataclass
class TensorRow:
    name: str
    shape: list[int]
    dtype: str
    params: int
    bytes: int
    file: str


@dataclass
class Totals:
    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class AdapterTargetRow:
    module: str
    rank: int
    alpha: float
    scale: float
    out_features: int
    in_features: int
    kernel: list[int] | None
    delta_norm: float  # ||scale · B @ A||_F, from the factors
    dora: bool
    bias: bool


@dataclass
class AdapterSummary:
    format: str
    targets: int
    ranks: list[int]
    alphas: list[float]
    use_rslora: bool
    modules_to_save: list[str]
    rows: list[AdapterTargetRow]
    # PEFT's init_lora_weights when it changed the base weights (PiSSA, OLoRA...): merges take
    # the initial s·B₀·A₀ out of the base first, as peft does when it loads the adapter
    base_changing_init: str | None = None


@dataclass
class SpectrumRow:
    name: str
    shape: list[int]
    full_rank: int
    effective_rank: float
    rank_90: int
    rank_95: int
    rank_99: int
    break_even: float
    sigma_max: float
    energy_at_rank: float | None = None
    singular_values: list[float] | None = None


@dataclass
class InspectResult:
    schema: str
    path: str
    kind: str
    kind_description: str
    weights_file: str | None
    files: list[str]
    metadata: dict[str, str]
    totals: Totals
    by_dtype: dict[str, Totals]
    by_group: dict[str, Totals]
    tensors: list[TensorRow]
    adapter: AdapterSummary | None = None
    factorized_layers: dict[str, Any] | None = None
    spectrum: list[SpectrumRow] | None = None
    spectrum_rank: int | None = None
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # a non-LoRA adapter (kind non-lora:...): why merge, convert, compose and resize refuse it
    unsupported: str | None = None

    def to_json(self, include_singular_values: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if d.get("spectrum") and not include_singular_values:
            for row in d["spectrum"]:
                row.pop("singular_values", None)
        return json_safe(d)


_DIGITS = re.compile(r"^\d+$")


def module_group(name: str) -> str:
    """Group a tensor by its path up to the first numeric part: ``encoder.layer.3``,
    ``embeddings``; kohya names (``lora_unet_down_blocks_0_...``) by their block."""
    parts = name.split(".")
    if len(parts) == 1 or (parts[0].startswith("lora_") and "_" in parts[0]):
        stem = parts[0]
        m = re.match(r"^(.*?_\d+)_", stem)
        return m.group(1) if m else stem
    for i, p in enumerate(parts[:-1]):
        if _DIGITS.match(p):
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


def detect_kind(path: Path, ck: Checkpoint) -> str:
    kind = adapter_kind(path, ck)
    if kind is not None:
        return kind
    layout = detect_layout(ck.names(), ck.metadata)
    if layout != "checkpoint":
        return layout
    if path.is_dir() and ck.config is not None:
        return "model-folder"
    return "checkpoint"


def inspect_checkpoint(
    path: str | Path,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    spectrum: bool = False,
    rank: int | None = None,
    keep_singular_values: bool = False,
    progress: ProgressFn | None = None,
) -> InspectResult:
    """Describe a checkpoint or adapter.

    Args:
        path: any input ``Checkpoint.open`` takes, or a PEFT adapter folder.
        include, exclude: globs over tensor (or module) names; each must match something.
        spectrum: compute singular-value statistics for every selected 2-D / conv weight.
        rank: with ``spectrum``, report the energy kept at this rank.
        keep_singular_values: keep each layer's singular values (for plots).
        progress: called as (done, total, name) while computing spectra.

    Returns:
        An ``InspectResult``; totals are over the selected tensors.

    Raises:
        InputNotFoundError, FormatError, MatchError, InvalidOptionError.
    """
    include, exclude = one_or_many(include), one_or_many(exclude)
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or folder", p)
    if rank is not None and rank <= 0:
        raise InvalidOptionError(f"--rank must be a positive integer, got {rank}")
    if rank is not None and not spectrum:
        raise InvalidOptionError("--rank needs --spectrum (it reports the energy kept at that rank)")
    with Checkpoint.open(p) as ck:
        kind = detect_kind(p, ck)
        ad = read_adapter(p) if kind in ADAPTER_KINDS else None
        if ad is None:
            names = select(ck.names(), include, exclude, can_allow=False).selected
            kept_modules = None
        else:
            names, kept_modules = _select_adapter(ck.names(), ad, include, exclude)
        rows: list[TensorRow] = []
        totals = Totals()
        by_dtype: dict[str, Totals] = {}
        by_group: dict[str, Totals] = {}
        for n in names:
            i = ck.info(n)
            rows.append(TensorRow(n, list(i.shape), i.dtype, i.numel, i.nbytes, i.file))
            for t in (totals, by_dtype.setdefault(i.dtype, Totals()), by_group.setdefault(module_group(n), Totals())):
                t.tensors += 1
                t.params += i.numel
                t.bytes += i.nbytes
        result = InspectResult(
            schema=SCHEMA,
            path=str(p),
            kind=kind,
            kind_description=KIND_NAMES.get(kind, _non_lora_description(kind)),
            weights_file=ck.weights_file.name if ck.weights_file else None,
            files=[f.name for f in ck.files],
            metadata=dict(sorted(ck.metadata.items())),
            totals=totals,
            by_dtype=dict(sorted(by_dtype.items())),
            by_group=dict(sorted(by_group.items())),
            tensors=rows,
            config=_config_summary(ck.config),
        )
        if kind.startswith("non-lora:"):
            try:
                read_adapter(p)
            except LorasurgeonError as e:
                result.unsupported = " ".join(e.message.split())
        if kind == "factorized":
            result.factorized_layers = json.loads(ck.metadata["lorasurgeon"]).get("layers", {})
        if spectrum and ad is None:
            result.spectrum = _spectra(ck, names, rank, keep_singular_values, progress, result.factorized_layers or {})
    if ad is not None:
        result.adapter = summarize_adapter(ad, kept_modules)
        if spectrum:
            result.spectrum = _adapter_spectra(ad, result.adapter, rank, keep_singular_values, progress, p)
    if spectrum:
        result.spectrum_rank = rank
    return result


ADAPTER_KINDS = ("peft", "kohya", "diffusers", "diffusers-legacy")


def _non_lora_description(kind: str) -> str:
    name = kind.removeprefix("non-lora:")
    if name.removesuffix(" (PEFT)") in PEFT_VARIANT_NAMES.values():
        return f"LoRA variant that is not plain LoRA: {name}"
    return f"non-LoRA adapter: {name}"


_LEGACY_PROCESSOR = re.compile(r"\.processor\.(to_[a-z_]+?)_lora\.")


def adapter_tensor_owners(names: Sequence[str], ad: Adapter) -> dict[str, str | None]:
    """The adapter module (a target, or a ``modules_to_save`` entry) each tensor name belongs to.

    A target owns a tensor when the tensor's name, without PEFT's ``base_model.model.`` prefix
    (and with the legacy diffusers ``processor.to_q_lora`` layout written as ``to_q``), starts
    with the module's name (or, in a kohya file, its stem) and a dot; the longest such name
    wins. A ``modules_to_save`` entry owns the tensor that holds it (PEFT's
    ``.modules_to_save.default.`` and ``.base_layer.`` wrappers removed). Tensors that belong to
    nothing (kohya's or diffusers' extra tensors) map to None.
    """
    saved = set(ad.modules_to_save)
    targets = {m: m for m in ad.targets}
    if ad.format == "kohya":  # targets named from recorded module names own the tensors of their stems
        targets.update({stem: m for m in ad.targets if not is_kohya_stem(m) for stem in kohya_stems(m)})
    owners: dict[str, str | None] = {}
    for n in names:
        key = n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n
        plain = peft_saved_name(n)  # as the reader names the saved tensors
        if plain in saved:
            owners[n] = plain
            continue
        key = _LEGACY_PROCESSOR.sub(lambda m: ".to_out.0." if m.group(1) == "to_out" else f".{m.group(1)}.", key)
        parts = key.split(".")
        owner = next((c for c in (".".join(parts[:j]) for j in range(len(parts) - 1, 0, -1)) if c in targets), None)
        owners[n] = targets[owner] if owner is not None else None
    return owners


def _select_adapter(
    names: list[str], ad: Adapter, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[str], set[str]]:
    """Tensors and modules of an adapter selected by globs over tensor names or module names.

    A pattern may name a tensor (``*.lora_A.weight``) or a module as the adapter table prints it
    (``encoder.layer.0.attention.self.query``); a tensor is kept when it or its module matches an
    include (or there is none) and neither matches an exclude. A module is kept when one of its
    tensors is.

    Raises:
        MatchError: a pattern matches no tensor and no module.
    """
    owners = adapter_tensor_owners(names, ad)
    modules = sorted(set(ad.targets) | set(ad.modules_to_save))
    unmatched = [
        f"{flag} {pat!r}"
        for flag, pats in (("--include", include or []), ("--exclude", exclude or []))
        for pat in pats
        if not any(matches(n, pat) for n in names) and not any(fnmatchcase(m, pat) for m in modules)
    ]
    if unmatched:
        raise MatchError(f"{', '.join(unmatched)} matches no tensor or module; check the pattern "
                         "(globs over tensor names or the module names of the adapter table, e.g. '*.attention.*')")

    def hit(n: str, pats: Sequence[str]) -> bool:
        o = owners[n]
        return any(matches(n, pat) or (o is not None and fnmatchcase(o, pat)) for pat in pats)

    kept = [n for n in names if (not include or hit(n, include)) and not hit(n, exclude or [])]
    return kept, {o for n in kept if (o := owners[n]) is not None}


def _config_summary(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if not config:
        return None
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "torch_dtype")
    return {k: config[k] for k in keys if k in config}


def summarize_adapter(ad: Adapter, keep: set[str] | None = None) -> AdapterSummary:
    """Per target: rank, alpha, scale and ||s·B·A||_F computed from the factors (no dense delta).

    ``keep``: the modules (targets and ``modules_to_save`` entries) to report; all when None.
    """
    if keep is None:
        keep = set(ad.targets) | set(ad.modules_to_save)
    rows = []
    for mod in sorted(ad.targets):
        if mod not in keep:
            continue
        t = ad.targets[mod]
        norm = abs(t.scale) * svd.lowrank_frobenius_norm(t.B, t.A)
        rows.append(
            AdapterTargetRow(
                module=mod,
                rank=t.rank,
                alpha=t.alpha,
                scale=t.scale,
                out_features=t.out_features,
                in_features=t.in_features,
                kernel=list(t.A.shape[2:]) if t.is_conv else None,
                delta_norm=norm,
                dora=t.magnitude is not None,
                bias=t.bias is not None,
            )
        )
    return AdapterSummary(
        format=ad.format,
        targets=len(rows),
        ranks=sorted({r.rank for r in rows}),
        alphas=sorted({r.alpha for r in rows}),
        use_rslora=ad.use_rslora,
        modules_to_save=sorted(m for m in ad.modules_to_save if m in keep),
        rows=rows,
        base_changing_init=next((t.init for t in ad.targets.values() if t.init), None),
    )


def is_matrix_weight(shape: Sequence[int], dtype: str) -> bool:
    """A 2-D matrix or a conv kernel with both sides > 1, of a floating dtype."""
    if dtype not in ("F16", "BF16", "F32", "F64") or len(shape) < 2:
        return False
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    return min(m, n) > 1


def _spectra(
    ck: Checkpoint, names: list[str], rank: int | None, keep_sv: bool, progress: ProgressFn | None,
    factorized: dict[str, dict[str, Any]],
) -> list[SpectrumRow]:
    """Per selected matrix, its singular-value statistics. A factorized layer ``P`` (either factor
    selected) gives one row, ``P.weight``: the spectrum of the layer's weight U·V (at most k values,
    from the factors, ``svd.product_svd``), not of U and V apart."""
    owner = {f"{p}.weight_{x}": p for p in factorized for x in "uv"}
    todo: list[str] = []
    for n in names:
        p = owner.get(n)
        if p is not None:
            if f"{p}.weight" not in todo:
                todo.append(f"{p}.weight")
        elif is_matrix_weight(ck.info(n).shape, ck.info(n).dtype):
            todo.append(n)
    if not todo:
        raise FormatError("no 2-D or conv weights among the selected tensors for --spectrum (only fp16, bf16, fp32 "
                          "and fp64 weights are analysed; fp8 and integer tensors are quantized data)", ck.path)
    out = []
    for i, n in enumerate(todo):
        if progress:
            progress(i, len(todo), n)
        p = n[: -len(".weight")]
        if p in factorized and f"{n}_u" in owner:
            shape = [int(d) for d in factorized[p]["shape"]]
            S = svd.product_svd(ck.get(f"{n}_u"), ck.get(f"{n}_v"), fp64=True).S
            out.append(_spectrum_row(n, shape, S, shape[0], math.prod(shape[1:]), rank, keep_sv))
            continue
        w = ck.get(n)
        try:
            S = svd.singular_values(w, name=n)
        except FormatError as e:  # NaN/Inf: the message names the tensor; name the file too
            raise FormatError(e.message, e.path or ck.path) from None
        m, k = svd.as_matrix(w).shape
        del w
        out.append(_spectrum_row(n, list(ck.info(n).shape), S, m, k, rank, keep_sv))
    if progress:
        progress(len(todo), len(todo), "")
    return out


def _spectrum_row(
    name: str, shape: list[int], S: torch.Tensor, m: int, n: int, rank: int | None, keep_sv: bool
) -> SpectrumRow:
    """Statistics of the singular values S of an m × n matrix (S may hold fewer than min(m, n))."""
    return SpectrumRow(
        name=name,
        shape=shape,
        full_rank=int(S.numel()),
        effective_rank=round(svd.effective_rank(S), 4),
        rank_90=svd.rank_for_energy(S, 0.90),
        rank_95=svd.rank_for_energy(S, 0.95),
        rank_99=svd.rank_for_energy(S, 0.99),
        break_even=round(svd.break_even_rank(m, n), 2),
        sigma_max=float(S[0].item()) if S.numel() else 0.0,
        energy_at_rank=(float(svd.energy_curve(S)[min(rank, S.numel()) - 1].item()) if rank and S.numel() else None),
        singular_values=[float(x) for x in S.tolist()] if keep_sv else None,
    )


def _adapter_spectra(
    ad: Adapter, summary: AdapterSummary, rank: int | None, keep_sv: bool, progress: ProgressFn | None, path: Path
) -> list[SpectrumRow]:
    """Spectra of each reported target's update s·B·A (as the out × in·kh·kw matrix), from the factors.

    The singular values come from the QR of both factors and the SVD of the r × r core
    (``svd.product_svd``, fp64), so there are at most ``rank`` of them and no dense delta is formed.
    For a DoRA target this is the update of the direction before the magnitude rescaling.
    """
    if not summary.rows:
        raise FormatError("no LoRA targets among the selected modules for --spectrum", path)
    out = []
    for i, row in enumerate(summary.rows):
        if progress:
            progress(i, len(summary.rows), row.module)
        t = ad.targets[row.module]
        S = svd.product_svd(t.B, t.A, fp64=True).S * abs(t.scale)
        m, n = t.out_features, t.in_features * (math.prod(row.kernel) if row.kernel else 1)
        out.append(_spectrum_row(row.module, [t.out_features, t.in_features, *(row.kernel or [])], S, m, n, rank, keep_sv))
    if progress:
        progress(len(summary.rows), len(summary.rows), "")
    return out


def plot_spectra(result: InspectResult, out: str | Path, force: bool = False) -> Path:
    """Draw the normalised spectra (S_i / S_0 against i / n) of the inspected layers to a PNG."""
    from lorasurgeon.io.writer import atomic_path

    if not result.spectrum or result.spectrum[0].singular_values is None:
        raise InvalidOptionError("--plot needs --spectrum")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidOptionError("--plot needs matplotlib: pip install 'lorasurgeon[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    rows = result.spectrum
    for row in rows:
        s = row.singular_values or []
        if not s or s[0] <= 0:
            continue
        n = len(s)
        ax.plot([(i + 1) / n for i in range(n)], [x / s[0] for x in s], lw=0.8, alpha=0.7,
                label=row.name if len(rows) <= 12 else None)
    ax.set_yscale("log")
    ax.set_xlabel("rank / full rank")
    ax.set_ylabel("σ_i / σ_max")
    ax.set_title(f"Normalised singular-value spectra: {Path(result.path).name} ({len(rows)} weights)")
    ax.grid(True, which="both", alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out, force) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(out)
