"""``convert``: PEFT ↔ kohya ↔ diffusers, checked delta by delta before anything is written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._finite import json_safe
from lorasurgeon.errors import (
    FormatError,
    InvalidOptionError,
    MatchError,
    UnsupportedError,
    VerificationError,
)
from lorasurgeon.io import adapters as io_ad
from lorasurgeon.io.adapters import DIFFUSERS_COMPONENTS, Adapter, LoraTarget
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.io.writer import check_output, provenance
from lorasurgeon.merge import _match
from lorasurgeon.nn.targeting import select
from lorasurgeon.ops.lora import check_init, delta_weight, init_correction

FORMATS = ("peft", "kohya", "diffusers")


@dataclass
class ConvertResult:
    schema: str
    input: str
    output: str
    from_format: str
    to_format: str
    targets: int
    max_abs_delta_diff: float  # the largest |ΔW_out − ΔW_in| over every layer, checked before writing
    renamed: dict[str, str]
    skipped_components: dict[str, int] = field(default_factory=dict)  # --component: the other parts' targets
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _one_component(ad: Adapter, component: str, path: str | Path) -> tuple[Adapter, dict[str, str], dict[str, int]]:
    """``--component``: keep that part's targets (dropping the other parts'), and give targets
    that name no part that part's prefix. Returns the adapter, renames and skipped counts."""
    ad, skipped = io_ad.keep_part(ad, component, Path(path).name, path)
    ad, ren = io_ad.give_part(ad, component)
    return ad, ren, skipped


def _strip_component(ad: Adapter, path: str | Path) -> tuple[Adapter, dict[str, str]]:
    """PEFT adapters are for one model: targets of one pipeline part lose its prefix (``unet.``);
    targets of several parts cannot go into one PEFT adapter."""
    comps = {io_ad.target_component(m) for m in ad.targets if not io_ad.is_kohya_stem(m)}
    if len(comps - {None}) > 1:
        raise UnsupportedError(f"a PEFT adapter is for one model, and this one holds LoRA for "
                               f"{', '.join(sorted(comps - {None}))}: pick one with --component", path)
    if len(comps) != 1 or None in comps:
        return ad, {}
    ren = {m: m.split(".", 1)[1] for m in ad.targets}
    return io_ad.rename_targets(ad, ren), ren


def _chain(first: dict[str, str], then: dict[str, str]) -> dict[str, str]:
    """Two rounds of renames as one: original name -> final name."""
    out = {k: then.get(v, v) for k, v in first.items()}
    out.update({m: n for m, n in then.items() if m not in first.values()})
    return out


def _reparse(ad: Adapter, fmt: str) -> Adapter:
    """Serialise to ``fmt`` in memory and read it back with the same readers users' files go through."""
    state, config = io_ad.adapter_state(ad, fmt)
    if fmt == "peft":
        return io_ad._read_peft(dict(state), {}, config, Path("<converted>"))
    if fmt == "kohya":
        return io_ad._read_kohya(dict(state), {k: str(v) for k, v in config.items()}, Path("<converted>"))
    return io_ad._read_diffusers(dict(state), dict(config), Path("<converted>"))


def _make_plain(ad: Adapter, base: str | Path, inp: str | Path, atol: float) -> tuple[Adapter, int, float]:
    """Targets made with a base-changing initialisation (PiSSA, OLoRA: ``LoraTarget.init``) as the
    plain LoRA that gives the same merged weight on ``base``: the adapter's s·B·A next to minus
    what the initialisation takes out of the base weight (``ops/lora.py::init_correction``), rank
    2r, scale 1, fp32 factors (fp64 for fp64 ones). PEFT's ``path_initial_model_for_weight_conversion``
    makes the same rank-2r adapter when it saves. Each new delta is checked against the adapter's
    plus the correction, in fp64. Returns the adapter, the number of targets rewritten and the
    largest difference."""
    todo = {m: t for m, t in ad.targets.items() if t.init}
    if not todo:
        return ad, 0, 0.0
    targets = dict(ad.targets)
    worst = 0.0
    with Checkpoint.open(base) as ck:
        names = set(ck.names())
        tmap, _, unmatched = _match(replace(ad, targets=todo, modules_to_save={}), {n for n in names if n.endswith(".weight")},
                                    names)
        if unmatched:
            raise MatchError(f"{len(unmatched)} target(s) match no weight of the base, e.g. {unmatched[0]!r}", base)
        for m, t in sorted(todo.items()):
            if f"{m}.weight" in ad.modules_to_save:  # peft saved this weight as the initialisation left it
                targets[m] = replace(t, init=None)
                continue
            try:
                check_init([(t, 1.0)], unmerge=False)
            except UnsupportedError as e:
                raise UnsupportedError(e.message, inp) from None
            W = ck.get(tmap[m])
            if tuple(W.shape) != tuple(t.delta_shape()):
                raise MatchError(f"{m!r}: adapter {list(t.delta_shape())} vs base {list(W.shape)}", base)
            c = init_correction(W, t)
            dt = torch.float64 if t.A.dtype == torch.float64 else torch.float32
            A = torch.cat([t.A.to(torch.float64), c.A]).to(dt)
            B = torch.cat([t.B.to(torch.float64) * t.scale, c.B * c.scale], dim=1).to(dt)
            k = int(A.shape[0])
            new = LoraTarget(m, A, B, math.sqrt(k) if ad.use_rslora else float(k), 1.0, None, t.bias, t.fan_in_fan_out)
            want = delta_weight(t, dtype=torch.float64) + delta_weight(c, dtype=torch.float64)
            diff = float((delta_weight(new, dtype=torch.float64) - want).abs().max())
            if diff > atol * max(float(want.abs().max()), 1e-12):
                raise VerificationError(f"layer {m!r}: the plain LoRA's delta is {diff:.3g} from the adapter's on this base "
                                        f"(tolerance {atol:g} relative)", inp)
            worst = max(worst, diff)
            targets[m] = new
    return replace(ad, targets=targets), len(todo), worst


def convert_adapter(inp: str | Path, to: str, out: str | Path, *, base: str | Path | None = None,
                    component: str | None = None, include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None, plain: bool = False, atol: float = 1e-6,
                    force: bool = False) -> ConvertResult:
    """Rewrite an adapter in another layout without changing any layer's delta.

    kohya names are lossy (``.`` → ``_``); leaving kohya needs ``base`` to map them back, unless
    the file records its module names (kohya files written by lorasurgeon do).

    Pipeline parts (``unet``, ``text_encoder``, ``text_encoder_2``, ...): kohya prefixes
    (``lora_unet_``, ``lora_te_``/``lora_te1_``, ``lora_te2_``) and diffusers prefixes
    (``unet.``) name them and are carried across; PEFT adapters are for one model, so targets of
    one part lose its prefix there, and an adapter for several parts needs ``component`` to pick
    one. ``component`` also names the part of an adapter whose names do not say (a PEFT adapter
    made on a UNet), so that kohya and diffusers loaders find its layers.

    ``include`` / ``exclude``: globs over the names the input holds (module names, or kohya stems
    for a kohya file; ``modules_to_save`` tensors by tensor or module name) that keep only some
    targets, e.g. to split an adapter that one output layout cannot hold whole.

    ``plain`` (needs ``base``): targets of a PEFT adapter made with a base-changing
    initialisation (``init_lora_weights`` "pissa" or "olora", which peft runs again on the base it
    loads the adapter onto) become plain LoRA of twice the rank that give the same merged weight
    on ``base`` (``_make_plain``). Without it, PEFT and diffusers outputs keep
    ``init_lora_weights`` and a kohya output is refused.

    Raises:
        InvalidOptionError: unknown format, or kohya → other without ``base``.
        VerificationError: a layer's delta changed by more than ``atol`` (relative to its max |ΔW|), exit 3.
    """
    if to not in FORMATS:
        raise InvalidOptionError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if component is not None and component not in DIFFUSERS_COMPONENTS:
        raise InvalidOptionError(f"--component must be one of {', '.join(DIFFUSERS_COMPONENTS)}, got {component!r}")
    if plain and base is None:
        raise InvalidOptionError("--plain needs --base: the plain LoRA depends on the base weights")
    check_output(out, force, [inp, base], directory=to == "peft")
    ad = io_ad.read_adapter(inp)
    from_format = ad.format
    if include or exclude:
        names = [*ad.targets, *ad.modules_to_save]
        try:
            keep = set(select(names, include, exclude, what="target", can_allow=False).selected)
        except MatchError as e:  # say what the names look like: a kohya file lorasurgeon wrote has module names
            raise MatchError(f"{e.message}; this adapter's targets are named like {sorted(names)[0]!r}", inp) from None
        if not keep & set(ad.targets):
            raise InvalidOptionError("--include/--exclude keep no LoRA target", inp)
        ad = replace(ad, targets={m: t for m, t in ad.targets.items() if m in keep},
                     modules_to_save={n: v for n, v in ad.modules_to_save.items() if n in keep})
    renamed: dict[str, str] = {}
    skipped: dict[str, int] = {}
    if component is not None:  # first, so that only that part's kohya stems need the base
        ad, renamed, skipped = _one_component(ad, component, inp)
    stems = [m for m in ad.targets if io_ad.is_kohya_stem(m)]  # names a kohya file holds only as stems
    if ad.format == "kohya" and to != "kohya" and (stems or base is not None):
        if base is None:
            raise InvalidOptionError(f"kohya names are lossy ('.' became '_', e.g. {stems[0]!r}); pass --base to map them "
                                     "to module names", inp)
        with Checkpoint.open(base) as ck:
            shapes = {n[: -len(".weight")]: tuple(ck.info(n).shape) for n in ck.names() if n.endswith(".weight")}
        mods = sorted(shapes)
        parts = sorted({io_ad.target_component(m) for m in stems} - {None})
        # diffusers files keep the part as a prefix; for PEFT it is set aside below
        ad, unmatched, ren = io_ad.resolve_kohya_names(ad, mods, prefix_components=to == "diffusers" or None)
        renamed = _chain(renamed, ren)
        if unmatched:
            hint = (f"; the file holds LoRA for {', '.join(parts)}: name the base's part with --component"
                    if len(parts) > 1 else "")
            raise FormatError(f"{len(unmatched)} kohya name(s) match no module of the base {Path(base).name}, "
                              f"e.g. {unmatched[0]!r}{hint}", inp)
        misfit = []
        for m, t in ad.targets.items():
            mod = m if m in shapes else m.partition(".")[2]  # a diffusers name keeps its part's prefix
            if mod in shapes and tuple(t.delta_shape()) != shapes[mod]:
                misfit.append(f"{m} ({list(t.delta_shape())} vs {list(shapes[mod])})")
        if misfit:  # the names fit, the layers do not: not this base's adapter
            raise FormatError(f"{len(misfit)} layer(s) do not fit the base {Path(base).name}: " + "; ".join(misfit[:3]), inp)
    warnings: list[str] = []
    if plain:
        ad, n_plain, plain_diff = _make_plain(ad, base, inp, atol)  # type: ignore[arg-type]
        if n_plain:
            warnings.append(f"{n_plain} target(s) made with a base-changing initialisation are now plain LoRA of twice "
                            f"their rank for {Path(base).name} (largest delta difference {plain_diff:.3g})")  # type: ignore[arg-type]
        else:
            warnings.append("--plain: no target was made with a base-changing initialisation; nothing to rewrite")
    if to == "peft" and from_format != "peft":  # (a PEFT input's names are module paths: GPT-2's transformer.h...)
        ad, ren = _strip_component(ad, inp)
        renamed = _chain(renamed, ren)
    _, note = io_ad.name_part(ad, to, None)  # (--component, when given, already named the part above)
    warnings += [note] if note else []
    back = _reparse(ad, to)
    worst = 0.0
    src_names = sorted(ad.targets)
    for m in src_names:
        name = m if m in back.targets else next((s for s in io_ad.kohya_stems(m) if s in back.targets), m) if to == "kohya" else (
            m if m.split(".", 1)[0] in DIFFUSERS_COMPONENTS else f"unet.{m}")
        if name not in back.targets:
            raise VerificationError(f"layer {m!r} is missing after conversion", inp)
        d0 = delta_weight(ad.targets[m], dtype=torch.float64)
        d1 = delta_weight(back.targets[name], dtype=torch.float64)
        diff = float((d0 - d1).abs().max()) if d0.numel() else 0.0
        scale = float(d0.abs().max()) if d0.numel() else 0.0
        worst = max(worst, diff)
        if diff > atol * max(scale, 1e-12):
            raise VerificationError(f"layer {m!r}: delta changed by {diff:.3g} in conversion (tolerance {atol:g} relative)", inp)
        if ad.targets[m].init != back.targets[name].init:
            raise VerificationError(f"layer {m!r}: its init_lora_weights {ad.targets[m].init!r} changed in conversion", inp)
        for part in ("magnitude", "bias"):  # DoRA magnitudes and LoRA biases: kept bit for bit
            v0, v1 = getattr(ad.targets[m], part), getattr(back.targets[name], part)
            if (v0 is None) != (v1 is None) or (v0 is not None and not torch.equal(v0.reshape(-1), v1.reshape(-1))):
                raise VerificationError(f"layer {m!r}: its {'DoRA magnitude' if part == 'magnitude' else 'LoRA bias'} "
                                        "changed in conversion", inp)
    for n, v in ad.modules_to_save.items():  # whole tensors that replace the base's: kept bit for bit
        got = back.modules_to_save.get(n)
        if got is None or got.shape != v.shape or not torch.equal(got, v):
            raise VerificationError(f"modules_to_save tensor {n!r} is {'missing' if got is None else 'changed'} "
                                    "after conversion", inp)
    opts = {"to": to, **({"include": list(include)} if include else {}), **({"exclude": list(exclude)} if exclude else {}),
            **({"plain": True} if plain else {})}
    io_ad.write_adapter(ad, out, to, provenance_meta=provenance("convert", opts, [inp] + ([base] if base else [])), force=force)
    return ConvertResult("lorasurgeon.convert/1", str(inp), str(out), from_format,
                         to, len(ad.targets), worst, renamed, skipped, warnings)
