"""``convert``: PEFT ↔ kohya ↔ diffusers, checked delta by delta before anything is written."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._finite import json_safe
from lorasurgeon.errors import FormatError, InvalidOptionError, VerificationError
from lorasurgeon.io import adapters as io_ad
from lorasurgeon.io.adapters import DIFFUSERS_COMPONENTS, Adapter, LoraTarget
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.io.writer import check_output, provenance
from lorasurgeon.ops.lora import delta_weight

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

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _strip_component(ad: Adapter) -> tuple[Adapter, dict[str, str]]:
    comps = {m.split(".", 1)[0] for m in ad.targets}
    if len(comps) != 1 or next(iter(comps)) not in DIFFUSERS_COMPONENTS:
        return ad, {}
    ren = {m: m.split(".", 1)[1] for m in ad.targets}
    targets = {ren[m]: LoraTarget(ren[m], t.A, t.B, t.alpha, t.scale, t.magnitude, t.bias, t.fan_in_fan_out)
               for m, t in ad.targets.items()}
    return Adapter(ad.format, targets, ad.modules_to_save, ad.metadata, ad.config, ad.use_rslora, ad.source), ren


def _reparse(ad: Adapter, fmt: str) -> Adapter:
    """Serialise to ``fmt`` in memory and read it back with the same readers users' files go through."""
    state, config = io_ad.adapter_state(ad, fmt)
    if fmt == "peft":
        return io_ad._read_peft(dict(state), {}, config, Path("<converted>"))
    if fmt == "kohya":
        return io_ad._read_kohya(dict(state), {}, Path("<converted>"))
    return io_ad._read_diffusers(dict(state), dict(config), Path("<converted>"))


def convert_adapter(inp: str | Path, to: str, out: str | Path, *, base: str | Path | None = None,
                    atol: float = 1e-6, force: bool = False) -> ConvertResult:
    """Rewrite an adapter in another layout without changing any layer's delta.

    kohya names are lossy (``.`` → ``_``); leaving kohya needs ``base`` to map them back, unless
    the file records its module names (kohya files written by lorasurgeon do). A diffusers adapter whose targets share one component (``unet.``) loses that prefix in PEFT.

    Raises:
        InvalidOptionError: unknown format, or kohya → other without ``base``.
        VerificationError: a layer's delta changed by more than ``atol`` (relative to its max |ΔW|), exit 3.
    """
    if to not in FORMATS:
        raise InvalidOptionError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    check_output(out, force, [inp, base], directory=to == "peft")
    ad = io_ad.read_adapter(inp)
    from_format = ad.format
    renamed: dict[str, str] = {}
    stems = [m for m in ad.targets if io_ad.is_kohya_stem(m)]  # names a kohya file holds only as stems
    if ad.format == "kohya" and to != "kohya" and (stems or base is not None):
        if base is None:
            raise InvalidOptionError(f"kohya names are lossy ('.' became '_', e.g. {stems[0]!r}); pass --base to map them "
                                     "to module names", inp)
        with Checkpoint.open(base) as ck:
            mods = sorted({n.rsplit(".", 1)[0] for n in ck.names() if n.endswith(".weight")})
        ad, unmatched, renamed = io_ad.resolve_kohya_names(ad, mods)
        if unmatched:
            raise FormatError(f"{len(unmatched)} kohya name(s) match no module of the base {Path(base).name}, "
                              f"e.g. {unmatched[0]!r}", inp)
    if ad.format == "diffusers" and to == "peft":
        ad, renamed = _strip_component(ad)
    back = _reparse(ad, to)
    worst = 0.0
    src_names = sorted(ad.targets)
    for m in src_names:
        name = m if m in back.targets else io_ad.kohya_name(m) if to == "kohya" else (
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
    for n, v in ad.modules_to_save.items():  # whole tensors that replace the base's: kept bit for bit
        got = back.modules_to_save.get(n)
        if got is None or got.shape != v.shape or not torch.equal(got, v):
            raise VerificationError(f"modules_to_save tensor {n!r} is {'missing' if got is None else 'changed'} "
                                    "after conversion", inp)
    opts = {"to": to}
    io_ad.write_adapter(ad, out, to, provenance_meta=provenance("convert", opts, [inp] + ([base] if base else [])), force=force)
    return ConvertResult("lorasurgeon.convert/1", str(inp), str(out), from_format,
                         to, len(ad.targets), worst, renamed)
