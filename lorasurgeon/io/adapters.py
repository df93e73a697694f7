"""Read LoRA adapters in PEFT, kohya/LyCORIS and diffusers layouts into one ``Adapter``.

Layouts (GUIDE §3):
- PEFT: folder with adapter_config.json + adapter_model.safetensors (or a bare file) with keys
  ``base_model.model.<module>.lora_A.weight`` (r×in), ``.lora_B.weight`` (out×r),
  ``.lora_magnitude_vector`` (DoRA), ``.lora_B.bias`` (lora bias).
- kohya / LyCORIS LoCon: ``lora_unet_<path with . → _>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha`` (missing alpha means alpha = rank).
- diffusers: PEFT-style keys with a component prefix (``unet.``, ``text_encoder.``...) and the
  config in the safetensors metadata key ``lora_adapter_metadata``; legacy
  ``...processor.to_q_lora.down.weight`` on read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._finite import all_finite
from lorasurgeon.errors import FormatError, InvalidOptionError, MatchError, UnsupportedError
from lorasurgeon.io.checkpoint import Checkpoint, named_adapter_subfolders

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_transformer_", "lycoris_")
# The pipeline component each kohya prefix names (lora_te_ is SD 1.x/2.x's one text encoder,
# lora_te1_/lora_te2_ SDXL's two); lycoris_ and the generic lora_ name none.
KOHYA_PREFIX_COMPONENT = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                          "lora_te_": "text_encoder", "lora_transformer_": "transformer"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer", "prior", "decoder")
PEFT_PREFIX = "base_model.model."

# LyCORIS and other non-LoRA layouts: detected by key fragments and refused by name.
NON_LORA_MARKERS = {
    "hada_w1_a": "LoHa (LyCORIS)",
    "hada_w2_b": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "lokr_w2": "LoKr (LyCORIS)",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "boft_R": "BOFT",  # (before oft_R: markers match as substrings, in this order)
    "oft_r": "OFT",
    "oft_R": "OFT",  # PEFT's OFT
    "ia3_l": "IA3",
    "vera_lambda": "VeRA",
    ".diff": "LyCORIS full (diff)",
    "lora_E": "AdaLoRA",
}


@dataclass
class LoraTarget:
    """One adapted module: delta W = scale · B @ A (conv: B∘A as a k×k conv then a 1×1 conv).

    Attributes:
        module: the base module name ("encoder.layer.0.attention.self.query"); for kohya files
            read without a base, the kohya key stem ("lora_unet_down_blocks_0_...").
        A: (r, in) or (r, in, kh, kw), the down projection.
        B: (out, r) or (out, r, 1, 1), the up projection.
        alpha: as stored.
        scale: the factor applied to B @ A (alpha/r, or alpha/sqrt(r) with rslora).
        magnitude: DoRA magnitude vector (out,), or None.
        bias: LoRA bias on B (out,), or None.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2 Conv1D); delta is transposed.
        init: PEFT's ``init_lora_weights`` when it changed the base weight as the adapter was
            made ("pissa", "olora", ...: ``_init_kind``), else None. Like peft, which
            runs that initialisation again when it loads the adapter, a merge first takes the
            initial s·B₀·A₀ out of the base weight (``ops/lora.py::init_correction``).
    """

    module: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    scale: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    fan_in_fan_out: bool = False
    init: str | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.A.ndim == 4

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this delta applies to."""
        if self.is_conv:
            return (self.out_features, self.in_features, *self.A.shape[2:])
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass
class Adapter:
    """A LoRA adapter in memory, whatever file layout it came from."""

    format: str  # "peft" | "kohya" | "diffusers"
    targets: dict[str, LoraTarget]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    use_rslora: bool = False
    source: str | None = None


# --------------------------------------------------------------------------- detection
def detect_layout(keys: list[str], metadata: Mapping[str, str]) -> str:
    """Name the layout of a flat tensor file: peft | kohya | diffusers | diffusers-legacy |
    factorized | non-lora:<name> | checkpoint."""
    if "lorasurgeon" in metadata:
        try:
            if json.loads(metadata["lorasurgeon"]).get("format") == "factorized":
                return "factorized"
        except (json.JSONDecodeError, AttributeError):
            pass
    for marker, name in NON_LORA_MARKERS.items():
        if any(marker in k for k in keys):
            if marker == ".diff" and not any(k.startswith(KOHYA_PREFIXES) for k in keys):
                continue
            if marker != ".diff" and any(k.startswith(PEFT_PREFIX) for k in keys):  # a PEFT adapter's weights file
                name = name.removesuffix(" (LyCORIS)") + " (PEFT)"
            return f"non-lora:{name}"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) and "." not in k.split(".lora_", 1)[0] for k in keys):
        return "kohya"
    has_peft_ab = any(".lora_A." in k or ".lora_B." in k or k.endswith((".lora_A.weight",)) for k in keys)
    if has_peft_ab:
        if any(k.startswith(PEFT_PREFIX) for k in keys):
            return "peft"
        if any(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in keys) or "lora_adapter_metadata" in metadata:
            return "diffusers"
        return "peft"
    if any("_lora.down.weight" in k or ".lora.down.weight" in k or ".lora_linear_layer.down.weight" in k for k in keys):
        return "diffusers-legacy"
    # LyCORIS layouts with no marker above and no LoRA factor at all: (IA)³, GLoRA, T-LoRA
    prefixed = [k for k in keys if k.startswith((*KOHYA_PREFIXES, GENERIC_KOHYA_PREFIX))]
    stems = {k.partition(".")[0] for k in prefixed}
    if stems and len(stems) * 2 >= len({k.partition(".")[0] for k in keys}):
        kinds = {_kohya_extra_kind(k) for k in prefixed} & set(LYCORIS_ONLY_KINDS)
        if kinds:
            return f"non-lora:{sorted(kinds)[0]}"
    return "checkpoint"


# What ``_kohya_extra_kind`` names that makes a file of kohya-prefixed tensors a LyCORIS adapter
# even with no LoRA factor in it.
LYCORIS_ONLY_KINDS = ("GLoRA (LyCORIS)", "(IA)³ (LyCORIS)", "T-LoRA (LyCORIS)")


def adapter_kind(path: str | Path, ck: Checkpoint) -> str | None:
    """The adapter layout of an opened input (peft, kohya, diffusers, diffusers-legacy or
    non-lora:<name>), or None when it holds a model's weights (or a factorized model's)."""
    if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file():
        return peft_folder_kind(Path(path) / "adapter_config.json")
    layout = detect_layout(ck.names(), ck.metadata)
    return None if layout in ("checkpoint", "factorized") else layout


# PEFT's peft_type values under the names the LyCORIS and paper layouts use (others as PEFT spells them)
PEFT_TYPE_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA", "VERA": "VeRA", "PROMPT_TUNING": "prompt tuning",
                   "P_TUNING": "P-tuning", "PREFIX_TUNING": "prefix tuning", "FOURIERFT": "FourierFT", "XLORA": "X-LoRA"}


def peft_folder_kind(cfg: Path) -> str:
    """"peft", or non-lora:<name> when a well-formed adapter_config.json is another PEFT method
    (LoHa, IA3, prompt tuning, ...) or a LoRA variant the reader refuses (``PEFT_VARIANTS``), so
    that inspect describes it; read_adapter says why it cannot be used. A config that does not
    parse is "peft" here, for read_adapter's error."""
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "peft"
    if not isinstance(config, dict):
        return "peft"
    ptype = config.get("peft_type", "LORA")
    if not isinstance(ptype, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,40}", ptype):
        return "peft"
    if ptype.upper() != "LORA":
        return f"non-lora:{PEFT_TYPE_NAMES.get(ptype.upper(), ptype.upper())} (PEFT)"
    variant = _peft_variant(config)
    return f"non-lora:{PEFT_VARIANT_NAMES[variant]} (PEFT)" if variant else "peft"


def network_algo(metadata: Mapping[str, str]) -> str | None:
    """The LyCORIS algorithm a kohya file's ``ss_network_args`` names, if any."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except (json.JSONDecodeError, TypeError):
        return None
    algo = args.get("algo") if isinstance(args, dict) else None
    return algo.lower() if isinstance(algo, str) else None


def dylora_note(ad: Adapter, label: str) -> str | None:
    """The warning for a DyLoRA-trained file (merge and export read it as LoCon at alpha/r)."""
    if network_algo(ad.metadata) != "dylora":
        return None
    return (f"{label} was trained as DyLoRA (ss_network_args); it is merged as LoCon at alpha/r, as LyCORIS's and "
            "kohya's loaders read it")


def refuse_adapter(path: str | Path, ck: Checkpoint, what: str, instead: str) -> None:
    """Commands that rewrite a model's weights refuse an adapter in the model's place (factorize
    would factor its A and B; merge would merge into them) with what to run instead.

    Raises:
        InvalidOptionError: ``path`` is an adapter.
    """
    kind = adapter_kind(path, ck)
    if kind is not None and kind.startswith("non-lora:"):
        raise InvalidOptionError(f"this is an adapter ({kind.removeprefix('non-lora:')}), not {what}", path)
    if kind is not None:
        raise InvalidOptionError(f"this is a LoRA adapter ({kind}), not {what}: {instead}", path)


def pattern_key(patterns: Mapping[str, Any], module: str, path: Any = None) -> str | None:
    r"""PEFT's rank_pattern/alpha_pattern lookup (``peft.utils.other.get_pattern_key``): the first
    key, in the config's order, that matches ``(.*\.)?(key)$`` on the module name: a regex on a
    dotted suffix, with the key grouped so that an alternation like ``query|key`` stays whole."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as e:
            raise FormatError(f"rank_pattern/alpha_pattern key {key!r} is not a valid regular expression ({e})", path) from None
    return None


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# --------------------------------------------------------------------------- reading
def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT folder or file, a kohya/LyCORIS file, or a diffusers LoRA file.

    Raises:
        FormatError: no LoRA tensors, unpaired A/B, inconsistent shapes, bad config.
        UnsupportedError: LoHa, LoKr, OFT and other non-LoRA layouts.
    """
    p = Path(path)
    config: dict[str, Any] = {}
    if p.is_dir():
        cfg = p / "adapter_config.json"
        if not cfg.is_file():
            named = named_adapter_subfolders(p)
            if named:  # PEFT saves adapters not called "default" in subfolders
                raise FormatError(f"folder holds PEFT adapters in subfolders ({', '.join(named[:5])}"
                                  f"{', ...' if len(named) > 5 else ''}); give one of them", p)
            raise FormatError("folder has no adapter_config.json; not a PEFT adapter", p)
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"adapter_config.json is not valid JSON ({e})", cfg) from None
        if not isinstance(config, dict):
            raise FormatError("adapter_config.json is not a JSON object", cfg)
        ptype = str(config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise UnsupportedError(f"peft_type {ptype} is not LoRA; only LoRA adapters are supported", cfg)
        _check_peft_config(config, cfg)
    with Checkpoint.open(p) as ck:
        layout = detect_layout(ck.names(), ck.metadata)  # a layout we refuse is refused before any tensor is read
        if not layout.startswith("non-lora:"):
            state = {n: ck.get(n) for n in ck.names()}
        metadata = dict(ck.metadata)
    if layout.startswith("non-lora:"):
        raise UnsupportedError(
            f"{layout.split(':', 1)[1]} adapter: only LoRA (and LoCon) layouts are supported", p
        )
    if p.is_dir() or layout == "peft":
        return _read_peft(state, metadata, config, p)
    if layout == "kohya":
        return _read_kohya(state, metadata, p)
    if layout in ("diffusers", "diffusers-legacy"):
        return _read_diffusers(state, metadata, p)
    raise FormatError("holds no LoRA tensors (no lora_A/lora_B, lora_down/lora_up keys)", p)


def _is_number(v: Any, *, integer: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return (isinstance(v, int) and v >= 1) if integer else math.isfinite(v)


# PEFT LoRA variants whose tensors do not mean delta W = s·B·A on the named module (or that are
# no weight update at all), by the adapter_config.json field that switches them on: refused by
# name rather than read as plain LoRA. (VeLoRA, MiCA, EVA, "gaussian" and "orthogonal" change only
# training or the initial values, so their adapters are plain LoRA and are read.)
PEFT_VARIANTS = {
    "alora_invocation_tokens": "Activated LoRA (aLoRA) acts only on the tokens from its invocation string on, so it "
                               "is no weight update (PEFT cannot merge it either)",
    "use_qalora": "QALoRA pools the inputs in groups of qalora_group_size before lora_A",
    "layer_replication": "it stacks repeated base layers into a deeper model, and its adapter names "
                         "layers the base does not hold",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. MoE expert tensors) is not LoRA on a module's "
                         "weight",
    "kasa_config": "KaSA truncates the base weight's smallest singular components and scales B·A by a learned "
                   "diagonal (lora_diag)",
    "use_bdlora": "BD-LoRA stores block-diagonal factors in a packed layout",
    "arrow_config": "Arrow routes each token between several LoRA experts",
}
PEFT_SUBCONFIGS = ("kasa_config", "arrow_config", "use_bdlora")  # on whenever not None (peft's _get_lora_subconfig)
PEFT_VARIANT_NAMES = {
    "alora_invocation_tokens": "aLoRA", "use_qalora": "QALoRA", "layer_replication": "LoRA with layer_replication",
    "target_parameters": "LoRA on target_parameters", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow",
}
# Tensors of LoRA variants whose merge is plain LoRA's (peft merges B·A alone): training-only
# state, read past. VeLoRA's activation projection; MonteCLoRA's sampler, which perturbs A in
# training.
PEFT_TRAINING_ONLY = (".lora_velora_embed", ".lora_monteclora_sampler.")


def _peft_variant(config: dict[str, Any]) -> str | None:
    """The first LoRA variant this PEFT config switches on that the reader refuses, or None."""
    for key in PEFT_VARIANTS:
        v = config.get(key)
        if key == "target_parameters" and isinstance(v, list) and all(
                isinstance(p, str) and p.rsplit(".", 1)[-1] == "weight" for p in v):
            continue  # a module's own weight: plain LoRA on that module (a 3-D one does not fit the base)
        if key in PEFT_SUBCONFIGS:
            if v is not None:  # peft builds the sub-config from any dict, {} included (its defaults)
                return key
        elif v not in (None, False, [], {}, ""):
            return key
    return None


def _init_kind(v: Any) -> str | None:
    """What an ``init_lora_weights`` value is to peft (``tuners/lora/layer.py::update_layer``, whose
    tests this mirrors, case and all): "base" (it changes the base weight), "plain", or None (not
    a value peft knows: peft refuses to load it).

    The base-changing ones: PiSSA, OLoRA, CorDA and LoRA-GA subtract s·B₀·A₀ from the base weight
    when the adapter is created, LoftQ quantizes it. An adapter saved without PEFT's
    ``path_initial_model_for_weight_conversion`` applies to that changed base, not the original."""
    if isinstance(v, bool):
        return "plain"
    if not isinstance(v, str):
        return None
    if v.startswith(("pissa", "corda")) or v.lower() == "olora" or v in ("loftq", "lora_ga"):
        return "base"
    return "plain" if v in ("gaussian", "eva", "orthogonal") or v.lower() == "mica" else None


def _base_changing(config: dict[str, Any]) -> str | None:
    """The config's ``init_lora_weights`` if it changes the base weight (``_init_kind``)."""
    v = config.get("init_lora_weights")
    return v if _init_kind(v) == "base" else None


def base_changing_init(targets: Mapping[str, LoraTarget]) -> str | None:
    """The one base-changing initialisation of these targets (one PEFT config's), or None.

    Raises:
        UnsupportedError: only some targets, or targets with different initialisations (PEFT has
            one ``init_lora_weights`` per config).
    """
    first: dict[str | None, str] = {}  # init -> the first module with it
    for m, t in sorted(targets.items()):
        first.setdefault(t.init, m)
    if len(first) > 1:
        (i1, m1), (i2, m2) = sorted(first.items(), key=lambda kv: kv[1])[:2]
        raise UnsupportedError(f"modules {m1!r} (init_lora_weights {i1 or True!r}) and {m2!r} ({i2 or True!r}) were "
                               "initialised differently, but PEFT has one init_lora_weights per adapter")
    return next(iter(first), None)


def refuse_base_changing(ad: Adapter, what: str) -> None:
    """Refuse an operation the initialisation's base change makes ill-posed (compose, resize...).

    Raises:
        UnsupportedError: a target was made with a base-changing initialisation.
    """
    t = next((t for t in ad.targets.values() if t.init), None)
    if t is not None:
        raise UnsupportedError(f"module {t.module!r} was initialised with init_lora_weights={t.init!r}, which changes "
                               f"the base weights, so {what}; convert it to a plain LoRA first (lorasurgeon convert "
                               "--to peft --plain --base BASE)", ad.source)


def _check_peft_config(config: dict[str, Any], cfg: Path) -> None:
    """The fields the reader computes with must have the types PEFT writes: a hand-edited or
    hostile config otherwise fails deep inside with a bare ValueError/TypeError. LoRA variants
    whose tensors mean something else (``PEFT_VARIANTS``) are refused by name."""
    variant = _peft_variant(config)
    if variant is not None:
        raise UnsupportedError(f"{variant} is set: {PEFT_VARIANTS[variant]}; only plain LoRA, DoRA and LoRA bias "
                               "adapters are supported", cfg)
    init = config.get("init_lora_weights", True)
    if _init_kind(init) is None:
        raise FormatError(f"'init_lora_weights' is {init!r:.40}, not an initialisation peft knows (peft refuses to load "
                          "it)", cfg)
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):  # a string "false" would read as true
            raise FormatError(f"'{flag}' must be true or false, got {config[flag]!r:.40}", cfg)
    r = config.get("r", 8)
    if not _is_number(r, integer=True):
        raise FormatError(f"'r' must be a positive integer, got {r!r:.60}", cfg)
    alpha = config.get("lora_alpha", r)
    if not _is_number(alpha):
        raise FormatError(f"'lora_alpha' must be a finite number, got {alpha!r:.60}", cfg)
    for key in ("rank_pattern", "alpha_pattern"):
        pat = config.get(key) or {}
        if not isinstance(pat, dict):
            raise FormatError(f"'{key}' must map module patterns to numbers, got {type(pat).__name__}", cfg)
        for k, v in pat.items():
            if not _is_number(v, integer=key == "rank_pattern"):
                raise FormatError(f"'{key}' gives {k!r:.60} the invalid value {v!r:.60}", cfg)
            try:
                re.compile(rf"(^|.*\.){k}$")
            except re.error as e:
                raise FormatError(f"'{key}' key {k!r:.60} is not a valid regular expression ({e})", cfg) from None


_CONV_OF_NDIM = {3: "Conv1d", 5: "Conv3d"}


def _pair_up(
    groups: dict[str, dict[str, torch.Tensor]], path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    out = {}
    for mod, parts in sorted(groups.items()):
        if "A" not in parts or "B" not in parts:
            missing = "A (down)" if "A" not in parts else "B (up)"
            raise FormatError(f"module {mod!r} has no {missing} matrix", path)
        A, B = parts["A"], parts["B"]
        for part, t in sorted(parts.items()):
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise UnsupportedError(f"module {mod!r}: its {part} tensor is {str(t.dtype).removeprefix('torch.')}; "
                                       "LoRA tensors must be fp16, bf16, fp32 or fp64", path)
        if A.ndim not in (2, 4) or B.ndim not in (2, 4):
            raise FormatError(
                f"module {mod!r}: down {tuple(A.shape)} and up {tuple(B.shape)}: only Linear (2-D) and Conv2d (4-D) "
                f"LoRA factors are supported (this is a {_CONV_OF_NDIM.get(max(A.ndim, B.ndim), 'higher-dimensional')} "
                "LoRA)", path)
        if A.ndim == 4 and B.ndim == 4 and B.shape[1] < A.shape[0] and A.shape[0] % B.shape[1] == 0:
            raise UnsupportedError(
                f"module {mod!r}: down {tuple(A.shape)} and up {tuple(B.shape)} look like a grouped-convolution LoRA "
                f"({A.shape[0] // B.shape[1]} groups); merging grouped or depthwise conv LoRA is not supported "
                "(PEFT's merge refuses it too)", path)
        if A.shape[0] != B.shape[1]:
            raise FormatError(
                f"module {mod!r}: down {tuple(A.shape)} and up {tuple(B.shape)} do not chain (ranks differ)", path
            )
        if A.shape[0] == 0 or A[0].numel() == 0 or B.shape[0] == 0:
            raise FormatError(f"module {mod!r}: down {tuple(A.shape)} and up {tuple(B.shape)} have an empty dimension", path)
        if B.ndim == 4 and tuple(B.shape[2:]) != (1, 1):
            raise FormatError(f"module {mod!r}: the up factor {tuple(B.shape)} must be a 1×1 conv (out, r, 1, 1)", path)
        if A.ndim != B.ndim:
            raise FormatError(f"module {mod!r}: down {tuple(A.shape)} and up {tuple(B.shape)} are not both Linear or both "
                              "Conv2d factors", path)
        bias = parts.get("bias")
        if bias is not None and (bias.ndim != 1 or bias.shape[0] != B.shape[0]):
            raise FormatError(f"module {mod!r}: its LoRA bias {tuple(bias.shape)} must hold one value per output row "
                              f"({B.shape[0]})", path)
        for part, t in sorted(parts.items()):
            if not all_finite(t):
                raise FormatError(f"module {mod!r}: its {part} tensor holds NaN or Inf values", path)
        out[mod] = (A, B, parts)
    return out


def peft_saved_name(key: str) -> str:
    """The base tensor a PEFT file's non-LoRA tensor replaces: without the ``base_model.model.``
    prefix and PEFT's wrappers (``modules_to_save[.default]``, and the ``base_layer`` of a LoRA'd
    module whose bias PEFT saved with ``bias="lora_only"`` / ``"all"``)."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".").replace(".base_layer.", ".")


def _read_peft(state: dict[str, torch.Tensor], metadata: dict[str, str], config: dict[str, Any], path: Path) -> Adapter:
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    fifo = bool(config.get("fan_in_fan_out", False))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    rx = re.compile(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.(?!weight$|bias$)([^.]+))?(?:\.(weight|bias))?$")
    if config.get("trainable_token_indices") or any(".token_adapter." in k for k in state):
        raise UnsupportedError("PEFT trainable tokens (trainable_token_indices) are not supported: their rows replace "
                               "embedding rows, which is not a LoRA update", path)
    for key, t in state.items():
        if any(f in key for f in PEFT_TRAINING_ONLY):
            continue
        m = rx.match(key)
        if not m or (".lora_embedding_" in key):
            if ".lora_embedding_" in key:
                raise UnsupportedError("embedding LoRA (lora_embedding_A/B) is not supported yet", path)
            unknown = re.search(r"\.(lora_[A-Za-z0-9_]+)\.", key + ".")
            if unknown:  # e.g. KaSA's lora_diag: pasted into the base as a modules_to_save tensor otherwise
                raise UnsupportedError(f"tensor {key!r} is a LoRA part this reader does not know ({unknown.group(1)}); "
                                       "only lora_A, lora_B, lora_magnitude_vector and lora_B bias are understood", path)
            saved[peft_saved_name(key)] = t
            continue
        mod, kind, _adapter_name, wb = m.groups()
        g = groups.setdefault(mod, {})
        if kind == "lora_A":
            if wb == "bias":
                raise FormatError(f"module {mod!r}: unexpected lora_A bias", path)
            g["A"] = t
        elif kind == "lora_B":
            g["bias" if wb == "bias" else "B"] = t
        else:
            g["magnitude"] = t
    targets: dict[str, LoraTarget] = {}
    for mod, (A, B, parts) in _pair_up(groups, path).items():
        rank = int(A.shape[0])
        ak = pattern_key(alpha_pattern, mod, path)
        # a bare file with no adapter_config.json states no alpha: alpha = r (scale 1), as kohya's
        # missing alpha and diffusers' missing metadata, not PEFT's default 8 over the file's rank
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default if config else float(rank)
        rk = pattern_key(rank_pattern, mod, path)
        expected_r = int(rank_pattern[rk]) if rk is not None else r_default
        scale_r = rank
        if config and expected_r != rank:
            # PiSSA and OLoRA at an r above the layer's smaller side keep that many rows; the scale is alpha over r
            if _base_changing(config) and A.ndim == 2 and rank == min(A.shape[1], B.shape[0]) < expected_r:
                scale_r = expected_r
            else:
                raise FormatError(
                    f"module {mod!r} has rank {rank} but adapter_config.json says r={expected_r}", path
                )
        mag = parts.get("magnitude")  # PEFT stores a conv's as (1, out, 1, 1)
        targets[mod] = LoraTarget(
            mod, A, B, alpha, lora_scale(alpha, scale_r, rslora),
            _dora_magnitude(mod, mag, A, B, path, "lora_magnitude_vector") if mag is not None else None,
            parts.get("bias"), fifo, _base_changing(config)
        )
    if not targets:
        raise FormatError("holds no LoRA tensors", path)
    if config:
        _check_switches(targets, config, "adapter_config.json", path)
    return Adapter("peft", targets, saved, metadata, config, rslora, str(path))


def _check_switches(targets: dict[str, LoraTarget], cfg: dict[str, Any], where: str, path: Path) -> None:
    """PEFT's ``use_dora`` and ``lora_bias`` are one switch for every target of a config: tensors
    that contradict a stated switch would be read one way here and another way by peft (a DoRA
    layer without its magnitude starts from the base weight's row norms; a magnitude or a
    ``lora_B`` bias the config does not switch on is ignored)."""
    if "use_dora" in cfg:
        with_mag = sorted(m for m, t in targets.items() if t.magnitude is not None)
        if cfg["use_dora"] and len(with_mag) < len(targets):
            lacking = sorted(m for m, t in targets.items() if t.magnitude is None)
            raise FormatError(f"{where} sets use_dora, but module {lacking[0]!r} has no lora_magnitude_vector "
                              "(peft would start its magnitude from the base weight's norms)", path)
        if not cfg["use_dora"] and with_mag:
            raise FormatError(f"module {with_mag[0]!r} has a lora_magnitude_vector, but {where} does not set "
                              "use_dora (peft would ignore it)", path)
    if "lora_bias" in cfg and not cfg["lora_bias"]:
        with_bias = sorted(m for m, t in targets.items() if t.bias is not None)
        if with_bias:
            raise FormatError(f"module {with_bias[0]!r} has a lora_B bias, but {where} does not set lora_bias "
                              "(peft would ignore it)", path)


def _one_dora_switch(targets: dict[str, LoraTarget], fmt: str, source: str | None) -> bool:
    """Whether these targets (one PEFT config's) are DoRA; refused when only some are."""
    with_mag = sorted(m for m, t in targets.items() if t.magnitude is not None)
    if with_mag and len(with_mag) < len(targets):
        without = sorted(m for m, t in targets.items() if t.magnitude is None)
        raise UnsupportedError(f"module {with_mag[0]!r} is DoRA and {without[0]!r} is not, but {fmt} has one "
                               f"use_dora switch per {'adapter' if fmt == 'peft' else 'part'}; keep this adapter in kohya (LyCORIS) format, or split "
                               "it (--include/--exclude)", source)
    return bool(with_mag)


def _read_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Adapter:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        stem, _, rest = key.partition(".")
        if rest in ("lora_down.weight",):
            groups.setdefault(stem, {})["A"] = t
        elif rest == "lora_up.weight":
            groups.setdefault(stem, {})["B"] = t
        elif rest == "alpha":
            alphas[stem] = t
        elif rest == "dora_scale":
            groups.setdefault(stem, {})["magnitude"] = t
        elif is_kohya_stem(stem) or key.startswith("bundle_emb."):
            raise UnsupportedError(f"{_kohya_extra_kind(key)} ({key!r}): only LoRA and LoCon (lora_down, lora_up, alpha, "
                                   "dora_scale) are supported, and nothing else in the file may be skipped", path)
        else:  # a module's tensor (the modules_to_save our kohya writer adds), named as in the model
            other[key] = t
    ours = KOHYA_MODULES_KEY in metadata or "lorasurgeon" in metadata
    stray = sorted(k for k in other if not ours or any(f in k for f in (".lora_A.", ".lora_B.", "lora_down", "lora_up")))
    if stray:
        # only a kohya file lorasurgeon wrote holds whole tensors (modules_to_save); anywhere else
        # (or a LoRA factor of another layout) it would be pasted into a merged checkpoint
        raise UnsupportedError(f"{len(stray)} tensor(s) that are not kohya LoRA, e.g. {stray[0]!r}: a kohya file holds "
                               "lora_down, lora_up, alpha and dora_scale per layer", path)
    orphan = sorted(s for s in alphas if s not in groups)
    if orphan:
        raise FormatError(f"alpha for {orphan[0]!r}, which has no lora_down / lora_up", path)
    names = _kohya_module_names(metadata, set(groups))
    targets: dict[str, LoraTarget] = {}
    for stem, (A, B, parts) in _pair_up(groups, path).items():
        rank = int(A.shape[0])
        if stem in alphas and (alphas[stem].numel() != 1 or alphas[stem].dtype == torch.bool
                               or not bool(torch.isfinite(alphas[stem].float()).all())):
            raise FormatError(f"module {stem!r}: alpha must be one finite number, got shape {list(alphas[stem].shape)}", path)
        alpha = float(alphas[stem].float().item()) if stem in alphas else float(rank)
        mag = parts.get("magnitude")
        mod = names.get(stem, stem)
        targets[mod] = LoraTarget(mod, A, B, alpha, lora_scale(alpha, rank, False),
                                  _dora_magnitude(stem, mag, A, B, path, "dora_scale") if mag is not None else None)
    if not targets:
        raise FormatError("holds no LoRA tensors", path)
    return Adapter("kohya", dict(sorted(targets.items())), other, metadata, {}, False, str(path))


def _kohya_extra_kind(key: str) -> str:
    """What a non-LoRA tensor in a kohya/LyCORIS file belongs to, for the refusal."""
    rest = key.partition(".")[2]
    if key.startswith("bundle_emb."):
        return "bundled textual-inversion embeddings (bundle_emb)"
    if rest.startswith("lora_mid"):
        return "LoCon with a Tucker core (lora_mid: LyCORIS use_tucker)"
    if rest.split(".", 1)[0] in ("a1", "a2", "b1", "b2"):
        return "GLoRA (LyCORIS)"
    if rest in ("on_input", "weight"):
        return "(IA)³ (LyCORIS)"
    if rest.split(".", 1)[0] == "lambda_layer":
        return "T-LoRA (LyCORIS)"
    if rest in ("w_norm", "b_norm"):
        return "trained norm layers (LyCORIS w_norm / b_norm)"
    if rest in ("scalar",):
        return "a LyCORIS scalar"
    return "a tensor that is not LoRA"


def _dora_magnitude(mod: str, mag: torch.Tensor, A: torch.Tensor, B: torch.Tensor, path: Path, what: str) -> torch.Tensor:
    """A DoRA magnitude as (out,): PEFT stores (out,) or (1, out, 1, 1), LyCORIS (out, 1) or
    (out, 1, 1, 1) (``wd_on_out=True``). LyCORIS's ``wd_on_out=False`` stores (1, in) or (1, in, 1, 1):
    the norm is then per input column, a different merge, refused rather than misread."""
    out, inn = int(B.shape[0]), int(A.shape[1])
    dims = [int(d) for d in mag.shape]
    if (what == "dora_scale" and out != 1 and mag.ndim >= 2 and dims[0] == 1 and dims[1] == inn
            and all(d == 1 for d in dims[2:])):
        raise UnsupportedError(f"module {mod!r}: {what} {dims} weighs the input columns (LyCORIS DoRA with "
                               "wd_on_out=False); only DoRA on the output rows is supported", path)
    if mag.numel() != out or (out > 1 and sum(d != 1 for d in dims) != 1):
        raise FormatError(f"module {mod!r}: {what} has {mag.numel()} values {dims} for {out} output rows", path)
    return mag.reshape(-1)


# Metadata key of the kohya files we write: {kohya stem: module name} for every target whose
# module name we knew, so that reading the file back needs no base to undo the lossy '.' -> '_'.
KOHYA_MODULES_KEY = "lorasurgeon.module_names"


def _kohya_module_names(metadata: Mapping[str, str], stems: set[str]) -> dict[str, str]:
    """The stem -> module names recorded in ``KOHYA_MODULES_KEY``, each checked to map back to its stem.

    An entry whose module name does not give its stem (a file renamed or edited by another tool)
    is ignored, and so is a malformed value: the names then come from a base as for any kohya file.
    """
    try:
        recorded = json.loads(metadata.get(KOHYA_MODULES_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {stem: mod for stem, mod in recorded.items()
            if isinstance(mod, str) and stem in stems and not is_kohya_stem(mod) and stem in kohya_stems(mod)}


def _diffusers_config(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """``lora_adapter_metadata`` per component, each checked like a PEFT config (a string
    ``"false"`` for ``use_rslora`` would otherwise read as true).

    Raises:
        FormatError: not a JSON object of ``"<component>.<field>"`` keys, or a field of the wrong type.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:  # ValueError: Python's digit limit
        raise FormatError(f"lora_adapter_metadata is not valid JSON ({type(e).__name__})", path) from None
    if not isinstance(flat, dict):
        raise FormatError(f"lora_adapter_metadata must be a JSON object, got {type(flat).__name__}", path)
    per: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        comp, _, fieldname = k.partition(".")
        if fieldname:
            per.setdefault(comp, {})[fieldname] = v
    for comp, cfg in per.items():
        try:
            _check_peft_config(cfg, path)
        except FormatError as e:
            raise FormatError(f"lora_adapter_metadata for {comp!r}: {e.message}", path) from None
    return per


def _read_diffusers(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Adapter:
    per = _diffusers_config(metadata, path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    legacy = re.compile(r"^(.*)\.processor\.(to_[a-z_]+?)_lora\.(down|up)\.weight$")
    # diffusers 0.14-0.20 text encoders: <module>.lora_linear_layer.down/up.weight
    legacy_te = re.compile(r"^(.*)\.lora_linear_layer\.(down|up)\.weight$")
    modern = re.compile(r"^(.*)\.(lora_A|lora_B|lora\.down|lora\.up)\.(weight|bias)$")
    magnitude = re.compile(r"^(.*)\.lora_magnitude_vector(?:\.weight)?$")
    other = []
    for key, t in state.items():
        def put(mod: str, part: str, t: torch.Tensor = t, key: str = key) -> None:
            g = groups.setdefault(mod, {})
            if part in g:  # two layouts (legacy and modern) for one module: one would silently win
                raise FormatError(f"module {mod!r} has two {part} tensors (another is beside {key!r}): two layouts "
                                  "in one file", path)
            g[part] = t

        m = legacy.match(key)
        if m:
            base, proj, which = m.groups()
            out = "to_out.0" if proj == "to_out" else proj
            put(f"{base}.{out}", "A" if which == "down" else "B")
            continue
        m = legacy_te.match(key)
        if m:
            mod, which = m.groups()
            put(mod, "A" if which == "down" else "B")
            continue
        m = modern.match(key)
        if m:
            mod, kind, wb = m.groups()
            if wb == "bias" and kind not in ("lora_B", "lora.up"):
                raise FormatError(f"module {mod!r}: unexpected {kind} bias", path)
            put(mod, "bias" if wb == "bias" else "A" if kind in ("lora_A", "lora.down") else "B")
            continue
        m = magnitude.match(key)
        if m:
            put(m.group(1), "magnitude")
            continue
        if key.endswith(".alpha"):
            if t.numel() != 1 or t.dtype == torch.bool or not bool(torch.isfinite(t.float()).all()):
                raise FormatError(f"{key!r} must be one finite number, got shape {list(t.shape)}", path)
            alphas[key[: -len(".alpha")]] = float(t.float().item())
            continue
        other.append(key)
    if other:  # diffusers LoRA files hold LoRA tensors only: anything else would be pasted into the base
        raise UnsupportedError(f"{len(other)} tensor(s) that are not LoRA, e.g. {other[0]!r}: only lora_A/lora_B "
                               "(lora.down/up), alpha, lora_magnitude_vector and lora_B bias are understood", path)
    orphan = sorted(m for m in alphas if m not in groups)
    if orphan:
        raise FormatError(f"alpha for {orphan[0]!r}, which has no LoRA factors", path)
    targets: dict[str, LoraTarget] = {}
    for mod, (A, B, parts) in _pair_up(groups, path).items():
        rank = int(A.shape[0])
        comp = mod.split(".", 1)[0]
        cfg = per.get(comp, {})
        rslora = bool(cfg.get("use_rslora", False))
        alpha = alphas.get(mod)
        sub = mod.split(".", 1)[1] if "." in mod else mod
        if "r" in cfg:  # metadata that contradicts the tensors: diffusers and PEFT would not load it either
            rk = pattern_key(cfg.get("rank_pattern") or {}, sub, path)
            expected = int(cfg["rank_pattern"][rk]) if rk is not None else int(cfg["r"])
            if expected != rank:
                raise FormatError(f"module {mod!r} has rank {rank} but lora_adapter_metadata says r={expected}", path)
        if alpha is None:
            try:
                ak = pattern_key(cfg.get("alpha_pattern") or {}, sub, path)
                alpha = float(cfg["alpha_pattern"][ak]) if ak is not None else float(cfg.get("lora_alpha", rank))
            except (TypeError, ValueError, KeyError, re.error) as e:
                raise FormatError(f"lora_adapter_metadata for {comp!r} is malformed ({type(e).__name__}: {e})", path) from None
            if not math.isfinite(alpha):
                raise FormatError(f"lora_adapter_metadata gives {mod!r} a non-finite alpha", path)
        mag = parts.get("magnitude")
        targets[mod] = LoraTarget(mod, A, B, alpha, lora_scale(alpha, rank, rslora),
                                  _dora_magnitude(mod, mag, A, B, path, "lora_magnitude_vector") if mag is not None else None,
                                  parts.get("bias"), init=_base_changing(cfg))
    if not targets:
        raise FormatError("holds no LoRA tensors", path)
    for comp, cfg in per.items():
        _check_switches({m: t for m, t in targets.items() if m.split(".", 1)[0] == comp}, cfg,
                        f"lora_adapter_metadata for {comp!r}", path)
    return Adapter("diffusers", targets, {}, metadata, per, any(c.get("use_rslora") for c in per.values()), str(path))


# --------------------------------------------------------------------------- names
KOHYA_COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
                          "transformer": "lora_transformer_"}
GENERIC_KOHYA_PREFIX = "lora_"


def kohya_name(module: str, *, sdxl: bool = True) -> str:
    """kohya stem of a module name: the component picks the prefix, dots become underscores.
    ``text_encoder.`` gives ``lora_te1_`` (SDXL's first encoder) or, with ``sdxl`` False (a
    pipeline with one text encoder, SD 1.x/2.x), ``lora_te_``."""
    if is_kohya_stem(module):
        return module  # already a kohya stem (the generic lora_ prefix included)
    comp, _, rest = module.partition(".")
    if rest and comp == "text_encoder" and not sdxl:
        return "lora_te_" + rest.replace(".", "_")
    if rest and comp in KOHYA_COMPONENT_PREFIX:
        return KOHYA_COMPONENT_PREFIX[comp] + rest.replace(".", "_")
    return GENERIC_KOHYA_PREFIX + module.replace(".", "_")


def kohya_stems(module: str) -> tuple[str, ...]:
    """Every stem kohya files use for ``module`` (``text_encoder.`` has two: lora_te1_ and lora_te_)."""
    return tuple(dict.fromkeys((kohya_name(module), kohya_name(module, sdxl=False))))


def target_component(name: str) -> str | None:
    """The pipeline component a target belongs to: from a kohya stem's prefix, or a module name's
    first part when it is one of ``DIFFUSERS_COMPONENTS``; None when the name does not say."""
    if is_kohya_stem(name):
        return next((c for p, c in KOHYA_PREFIX_COMPONENT.items() if name.startswith(p)), None)
    first = name.split(".", 1)[0]
    return first if "." in name and first in DIFFUSERS_COMPONENTS else None


def is_kohya_stem(name: str) -> bool:
    """A kohya key stem (``lora_unet_a_b``: prefix, no dot), as opposed to a module name."""
    return "." not in name and name.startswith((*KOHYA_PREFIXES, GENERIC_KOHYA_PREFIX))


def _strip_kohya_prefix(stem: str) -> str:
    for p in (*KOHYA_PREFIXES, GENERIC_KOHYA_PREFIX):
        if stem.startswith(p):
            return stem[len(p):]
    return stem


def adapter_parts(ad: Adapter) -> dict[str | None, list[str]]:
    """The adapter's targets by pipeline part (``target_component``; None: names no part)."""
    parts: dict[str | None, list[str]] = {}
    for m in ad.targets:
        parts.setdefault(target_component(m), []).append(m)
    return parts


def keep_part(ad: Adapter, part: str, label: str, path: str | Path | None) -> tuple[Adapter, dict[str, int]]:
    """The targets of pipeline part ``part`` and those that name no part; and {other part: its
    number of targets}, set aside.

    Raises:
        MatchError: the adapter names parts, and ``part`` is not one of them.
    """
    parts = adapter_parts(ad)
    named = sorted(c for c in parts if c is not None)
    if named and part not in named:
        raise MatchError(f"{label} has no LoRA for --component {part}; it has {', '.join(named)}", path)
    kept = {m: t for m, t in ad.targets.items() if target_component(m) in (part, None)}
    return replace(ad, targets=kept), {c: len(parts[c]) for c in named if c != part}


def give_part(ad: Adapter, component: str) -> tuple[Adapter, dict[str, str]]:
    """The targets that name no pipeline part get ``component``'s: ``unet.`` before a module name,
    a kohya stem's prefix swapped (``lora_fc1`` -> ``lora_unet_fc1``). Returns the adapter and
    the renames."""
    sdxl = any(target_component(m) == "text_encoder_2" for m in ad.targets)
    ren = {m: (kohya_name(f"{component}.{_strip_kohya_prefix(m)}", sdxl=sdxl) if is_kohya_stem(m) else f"{component}.{m}")
           for m in ad.targets if target_component(m) is None}
    return rename_targets(ad, ren), ren


def rename_targets(ad: Adapter, ren: Mapping[str, str]) -> Adapter:
    """``ad`` with targets renamed by ``ren`` (old -> new; the others keep their names)."""
    return replace(ad, targets={ren.get(m, m): replace(t, module=ren.get(m, m)) for m, t in ad.targets.items()})


def check_component(fmt: str, component: str | None) -> None:
    """A ``--component`` for an output of layout ``fmt`` (called before any work is done).

    Raises:
        InvalidOptionError: not a pipeline part, or given for a PEFT output (an adapter for one model).
    """
    if component is None:
        return
    if component not in DIFFUSERS_COMPONENTS:
        raise InvalidOptionError(f"--component must be one of {', '.join(DIFFUSERS_COMPONENTS)}, got {component!r}")
    if fmt == "peft":
        raise InvalidOptionError("--component names the pipeline part of a kohya or diffusers output; a PEFT adapter "
                                 "is for one model and names none")


def name_part(ad: Adapter, fmt: str, component: str | None) -> tuple[Adapter, str | None]:
    """A kohya or diffusers output's targets need their pipeline part: kohya loaders find layers
    by ``lora_unet_`` / ``lora_te_`` prefixes, diffusers by ``unet.`` / ``text_encoder.``.
    ``component`` gives it to the targets whose names say none; without it, such targets give a
    warning (returned), since the file would load as nothing (kohya) or under ``unet.``.

    Raises:
        InvalidOptionError: see ``check_component``.
    """
    check_component(fmt, component)
    if component is not None:
        return give_part(ad, component)[0], None
    partless = sorted(m for m in ad.targets if target_component(m) is None)
    if fmt == "peft" or not partless or all(is_kohya_stem(m) for m in partless):
        return ad, None
    return ad, (f"{len(partless)} target(s) name no pipeline part (e.g. {partless[0]!r}): "
                + ("kohya loaders find layers by lora_unet_ / lora_te_ prefixes and will skip them"
                   if fmt == "kohya" else "the diffusers file puts them under unet.")
                + "; pass --component to say which part they belong to")


def refuse_lossy_stems(ad: Adapter, fmt: str, path: str | Path | None) -> None:
    """kohya stems (``lora_unet_a_b``) are not module names: written to a PEFT or diffusers file
    they would name modules no model has. Only ``convert --base`` can map them.

    Raises:
        InvalidOptionError: ``fmt`` is not kohya and some target is still a stem.
    """
    stems = sorted(m for m in ad.targets if is_kohya_stem(m))
    if stems and fmt != "kohya":
        raise InvalidOptionError(f"kohya names are lossy ('.' became '_', e.g. {stems[0]!r}) and a {fmt} file needs module "
                                 "names: map them first with lorasurgeon convert FILE --to peft --base BASE, or write "
                                 "--format kohya", path)


def resolve_kohya_names(ad: Adapter, base_modules: list[str], *,
                        prefix_components: bool | None = None) -> tuple[Adapter, list[str], dict[str, str]]:
    """Map kohya stems back to the base model's module names (``.`` → ``_`` is lossy, so the
    base's names are enumerated). Returns the renamed adapter, the stems that matched nothing,
    and the renames (stem → module name).

    The base is one component's weights (a UNet, a text encoder), so a stem's component prefix
    (``lora_unet_``, ``lora_te1_``, ...) is set aside to match, and put back as a diffusers-style
    prefix (``text_encoder_2.``) when ``prefix_components`` is True, or when None and the file
    spans several components: SDXL's ``lora_te1_x`` and ``lora_te2_x`` are different layers of the
    same name in two encoders, and must not fall onto one.

    Raises:
        FormatError: a stem maps to several base modules (the candidates are named), or two stems
            to one module.
    """
    by_key: dict[str, list[str]] = {}
    for m in base_modules:
        by_key.setdefault(m.replace(".", "_"), []).append(m)
    if prefix_components is None:
        prefix_components = len({target_component(m) for m in ad.targets if is_kohya_stem(m)} - {None}) > 1
    targets: dict[str, LoraTarget] = {}
    unmatched: list[str] = []
    renames: dict[str, str] = {}
    claimed: dict[str, tuple[str | None, str]] = {}  # stem -> (its part, the base module it maps to)
    for stem, t in ad.targets.items():
        if not is_kohya_stem(stem):  # already a module name
            targets[stem] = t
            continue
        cands = by_key.get(_strip_kohya_prefix(stem), [])
        if len(cands) > 1:
            raise FormatError(f"kohya name {stem!r} is ambiguous: it fits {', '.join(sorted(cands))}", ad.source)
        if not cands:
            unmatched.append(stem)
            targets[stem] = t
            continue
        comp = target_component(stem)
        name = f"{comp}.{cands[0]}" if prefix_components and comp else cands[0]
        # one base module claimed twice: by two stems of one part, or by a part-less stem
        # (lycoris_, lora_) and a part's (lora_unet_): the merge would add both deltas
        first = next((s for s, n in claimed.items() if n[1] == cands[0] and (n[0] == comp or None in (n[0], comp))), None)
        if first is not None:
            raise FormatError(f"kohya names {first!r} and {stem!r} both map to the module {cands[0]!r}", ad.source)
        claimed[stem] = (comp, cands[0])
        targets[name] = replace(t, module=name)
        renames[stem] = name
    return replace(ad, targets=dict(sorted(targets.items()))), unmatched, renames


# --------------------------------------------------------------------------- writing
def _alpha_for(t: LoraTarget, rslora: bool) -> float:
    """The alpha that gives this target's scale at its rank (so the scale is stated exactly)."""
    return t.scale * math.sqrt(t.rank) if rslora else t.scale * t.rank


def _peft_tensors(t: LoraTarget, lora_bias: bool) -> dict[str, torch.Tensor]:
    """A target's tensors in PEFT's keys (a diffusers file uses the same ones): the factors, the
    DoRA magnitude (PEFT's shapes: (out,) for Linear, (1, out, 1, 1) for Conv2d) and, when the
    config's one ``lora_bias`` switch is on, a bias (zeros for targets without one, as peft has)."""
    out = {"lora_A.weight": t.A, "lora_B.weight": t.B}
    if lora_bias:
        out["lora_B.bias"] = t.bias if t.bias is not None else t.B.new_zeros(t.B.shape[0])
    if t.magnitude is not None:
        out["lora_magnitude_vector"] = t.magnitude.reshape(1, -1, 1, 1) if t.is_conv else t.magnitude.reshape(-1)
    return out


def adapter_state(ad: Adapter, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (and, for PEFT, the adapter_config.json) of ``ad`` in layout ``fmt``.

    Alpha is rewritten per target so that alpha/r (alpha/sqrt(r) with rslora) equals the stored
    scale exactly, whatever scale the target carries."""
    state: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    if fmt != "peft":
        fifo = sorted(m for m, t in ad.targets.items() if t.fan_in_fan_out)
        if fifo:  # the other layouts have no flag for it: the factors would be read as transposed
            raise UnsupportedError(f"fan_in_fan_out targets (GPT-2 style Conv1D layers, e.g. {fifo[0]!r}) keep their "
                                   f"layout only in PEFT; {fmt} files have no field for it: use peft", ad.source)
    if fmt == "peft":
        if len({t.fan_in_fan_out for t in ad.targets.values()}) > 1:
            fifo = sorted(m for m, t in ad.targets.items() if t.fan_in_fan_out)
            raise UnsupportedError(f"PEFT's fan_in_fan_out is one flag for every target, but only some targets are "
                                   f"Conv1D layers (e.g. {fifo[0]!r}); split the adapter (--include/--exclude)", ad.source)
        rs = ad.use_rslora
        ranks = sorted(t.rank for t in ad.targets.values())
        alphas = {m: _alpha_for(t, rs) for m, t in ad.targets.items()}
        r_default = max(set(ranks), key=lambda r: (ranks.count(r), -r)) if ranks else 8
        alpha_values = list(alphas.values())
        a_default = max(set(alpha_values), key=lambda a: (alpha_values.count(a), -a)) if alpha_values else 8
        any_bias = any(t.bias is not None for t in ad.targets.values())
        for m, t in ad.targets.items():
            state.update({f"{PEFT_PREFIX}{m}.{k}": v for k, v in _peft_tensors(t, any_bias).items()})
        biases = peft_bias_tensors(ad)
        # A LoRA'd module's own saved tensors (its bias with PEFT's bias setting, its weight with
        # save_embedding_layers) live in PEFT's wrapper as <module>.base_layer.<name>; listed in
        # modules_to_save, peft would wrap the module whole and drop its LoRA.
        under_lora = {n for n in ad.modules_to_save if n.rsplit(".", 1)[0] in ad.targets}
        for n, v in ad.modules_to_save.items():
            mod, leaf = n.rsplit(".", 1) if "." in n else ("", n)
            state[f"{PEFT_PREFIX}{mod}.base_layer.{leaf}" if n in under_lora else f"{PEFT_PREFIX}{n}"] = v
        whole = [n for n in ad.modules_to_save if n not in biases and n not in under_lora]
        saved_modules = sorted({n.rsplit(".", 1)[0] for n in whole})
        # the modules the adapter came with (a whole head such as RoBERTa's ``classifier``, which
        # holds ``dense`` and ``out_proj``): peft wraps those, and loads the tensors beneath them
        stated = ad.config.get("modules_to_save")
        if (isinstance(stated, list) and stated and all(isinstance(m, str) for m in stated)
                and all(any(n.startswith(m + ".") for m in stated) for n in whole)):
            saved_modules = sorted(m for m in stated if m not in ad.targets)
        config = {
            "peft_type": "LORA",
            "task_type": ad.config.get("task_type"),
            "base_model_name_or_path": ad.config.get("base_model_name_or_path"),
            "r": r_default,
            "lora_alpha": a_default,
            "target_modules": sorted(ad.targets),
            "rank_pattern": {re.escape(m): t.rank for m, t in sorted(ad.targets.items()) if t.rank != r_default},
            "alpha_pattern": {re.escape(m): a for m, a in sorted(alphas.items()) if a != a_default},
            "use_rslora": rs,
            "use_dora": _one_dora_switch(ad.targets, "peft", ad.source),
            "lora_bias": any_bias,
            "fan_in_fan_out": any(t.fan_in_fan_out for t in ad.targets.values()),
            "modules_to_save": saved_modules or None,
            "bias": ("none" if not biases else "lora_only" if all(n.rsplit(".", 1)[0] in ad.targets for n in biases)
                     else "all"),
            "lora_dropout": float(ad.config.get("lora_dropout") or 0.0),  # attach's --dropout (no effect on merging)
            "inference_mode": True,
            # a base-changing initialisation stays stated: peft reads the adapter against that base
            "init_lora_weights": base_changing_init(ad.targets) or True,
        }
    elif fmt == "kohya":
        sdxl = any(target_component(m) == "text_encoder_2" for m in ad.targets)
        stem_of: dict[str, str] = {}
        for m in ad.targets:
            stem = kohya_name(m, sdxl=sdxl)
            if stem in stem_of:
                raise UnsupportedError(f"modules {stem_of[stem]!r} and {m!r} have the same kohya name {stem!r} ('.' and "
                                       "'_' both become '_'); keep this adapter in peft or diffusers", ad.source)
            stem_of[stem] = m
        for m, t in ad.targets.items():
            if t.bias is not None:
                raise UnsupportedError(f"kohya files cannot hold a LoRA bias (module {m!r}); use peft", ad.source)
            if t.init:
                raise UnsupportedError(f"module {m!r} was initialised with init_lora_weights={t.init!r}, which changes the "
                                       "base weights, and kohya files cannot say so; convert it to a plain LoRA for its "
                                       "base (--plain --base BASE), or use peft", ad.source)
            stem = kohya_name(m, sdxl=sdxl)
            state[f"{stem}.lora_down.weight"] = t.A
            state[f"{stem}.lora_up.weight"] = t.B
            state[f"{stem}.alpha"] = torch.tensor(_alpha_for(t, False), dtype=torch.float32)
            if t.magnitude is not None:
                state[f"{stem}.dora_scale"] = t.magnitude.reshape(-1, 1) if t.A.ndim == 2 else t.magnitude.reshape(-1, 1, 1, 1)
        for n, v in ad.modules_to_save.items():
            state[n] = v
        known = {kohya_name(m, sdxl=sdxl): m for m in ad.targets if not is_kohya_stem(m)}
        if known or ad.modules_to_save:  # the key also marks whole tensors as ours (the reader refuses others)
            config = {KOHYA_MODULES_KEY: json.dumps(dict(sorted(known.items())))}
    elif fmt == "diffusers":
        per: dict[str, dict[str, Any]] = {}
        if ad.modules_to_save:
            raise UnsupportedError(f"diffusers LoRA files cannot hold modules_to_save ({', '.join(sorted(ad.modules_to_save)[:3])}"
                                   f"{', ...' if len(ad.modules_to_save) > 3 else ''}); use peft or kohya", ad.source)
        named = {m: m if m.split(".", 1)[0] in DIFFUSERS_COMPONENTS else f"unet.{m}" for m in ad.targets}
        parts: dict[str, dict[str, LoraTarget]] = {}
        for m, t in ad.targets.items():
            parts.setdefault(named[m].partition(".")[0], {})[m] = t
        # each part is one PEFT config when diffusers loads it: one use_dora and one lora_bias switch
        dora = {comp: _one_dora_switch(ts, "diffusers", ad.source) for comp, ts in parts.items()}
        bias = {comp: any(t.bias is not None for t in ts.values()) for comp, ts in parts.items()}
        init = {comp: base_changing_init(ts) for comp, ts in parts.items()}
        for m, t in ad.targets.items():
            name = named[m]
            comp, _, sub = name.partition(".")
            state.update({f"{name}.{k}": v for k, v in _peft_tensors(t, bias[comp]).items()})
            if comp in ("text_encoder", "text_encoder_2"):
                # CLIP under transformers 5 has no text_model level, and diffusers strips it from the
                # keys but not from these names: a suffix matches either way (PEFT matches
                # target_modules and pattern keys as dotted suffixes)
                sub = sub.removeprefix("text_model.")
            c = per.setdefault(comp, {"r": t.rank, "lora_alpha": _alpha_for(t, ad.use_rslora), "use_rslora": ad.use_rslora,
                                      "target_modules": [], "rank_pattern": {}, "alpha_pattern": {}})
            if dora[comp]:
                c["use_dora"] = True
            if init[comp]:
                c["init_lora_weights"] = init[comp]
            if bias[comp]:
                c["lora_bias"] = True
            c["target_modules"].append(sub)
            if t.rank != c["r"]:
                c["rank_pattern"][re.escape(sub)] = t.rank
            if _alpha_for(t, ad.use_rslora) != c["lora_alpha"]:
                c["alpha_pattern"][re.escape(sub)] = _alpha_for(t, ad.use_rslora)
        flat = {f"{comp}.{k}": v for comp, c in sorted(per.items()) for k, v in c.items()}
        config = {"lora_adapter_metadata": json.dumps(flat, sort_keys=True)}
    else:
        raise InvalidOptionError(f"unknown adapter format {fmt!r}; choose peft, kohya or diffusers")
    return state, config


def peft_bias_tensors(ad: Adapter) -> set[str]:
    """The saved tensors that PEFT's ``bias`` setting ("lora_only" / "all") saves, not modules_to_save.

    A module of which only ``.bias`` is saved (a trained bias, its weight the base's) is one;
    a module saved whole (weight and bias: a new head) is a ``modules_to_save`` module.
    """
    by_module: dict[str, list[str]] = {}
    for n in ad.modules_to_save:
        by_module.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return {names[0] for names in by_module.values() if len(names) == 1 and names[0].endswith(".bias")}


def write_adapter(ad: Adapter, out: str | Path, fmt: str, *, provenance_meta: dict[str, Any] | None = None,
                  force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``ad`` atomically: a PEFT folder (adapter_config.json + adapter_model.safetensors,
    plus ``extra_files`` such as metrics.json), or a single kohya / diffusers ``.safetensors``
    file. kohya ss_*/modelspec.* metadata is kept."""
    from lorasurgeon.io.writer import METADATA_KEY, atomic_path, save_state_dict, write_json_atomic

    if fmt == "peft" and Path(out).suffix.lower() in (".safetensors", ".bin", ".pt"):
        raise InvalidOptionError(f"a PEFT adapter is a folder, but -o {Path(out).name} names a file: give a folder name, "
                                 "or --format kohya / diffusers for a single file", out)
    state, config = adapter_state(ad, fmt)
    state = {k: v.contiguous() for k, v in state.items()}
    meta: dict[str, Any] = {}
    if provenance_meta is not None:
        meta[METADATA_KEY] = provenance_meta
    if fmt == "kohya":
        meta.update({k: v for k, v in ad.metadata.items() if k.startswith(("ss_", "modelspec."))})
    if fmt == "peft":
        meta["format"] = "pt"
        with atomic_path(out, force, directory=True) as tmp:
            save_state_dict(tmp / "adapter_model.safetensors", state, meta)
            write_json_atomic(tmp / "adapter_config.json", config)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
        return Path(out)
    meta.update(config)
    return save_state_dict(out, state, meta, force=force)
