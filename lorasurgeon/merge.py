"""``merge``: fold LoRA adapters into base weights, streaming the base one tensor at a time."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._args import one_or_many
from lorasurgeon._finite import json_safe
from lorasurgeon.errors import FormatError, InvalidOptionError, MatchError, UnsupportedError
from lorasurgeon.io.adapters import (
    DIFFUSERS_COMPONENTS,
    Adapter,
    LoraTarget,
    adapter_parts,
    dylora_note,
    keep_part,
    read_adapter,
    refuse_adapter,
    resolve_kohya_names,
)
from lorasurgeon.io.checkpoint import ST_DTYPES, Checkpoint
from lorasurgeon.io.writer import (
    METADATA_KEY,
    DeferredProvenance,
    TensorSpec,
    check_folder_name,
    check_output,
    require_output,
    write_like_input,
)
from lorasurgeon.nn.layers import factorized_layers
from lorasurgeon.nn.models import head_size, tied_input_embedding
from lorasurgeon.ops import lora

SCHEMA = "lorasurgeon.merge/1"
ProgressFn = Callable[[int, int, str], None]


@dataclass
class MergeLayer:
    module: str
    shape: list[int]
    adapters: list[int]  # indices of the adapters applied, in input order
    update_norm: float  # ||W' − W||_F
    relative_update: float  # ||W' − W||_F / ||W||_F


@dataclass
class MergeResult:
    schema: str
    base: str
    adapters: list[str]
    weights: list[float]
    output: str | None
    unmerge: bool
    dry_run: bool
    layers: list[MergeLayer]
    replaced: list[str]  # modules_to_save tensors that replaced base tensors
    added: list[str]  # modules_to_save tensors the base did not have
    unmatched: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # "config": the class the output folder became
    warnings: list[str] = field(default_factory=list)  # each also given to ``warn`` as it happens

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _candidates(name: str) -> list[str]:
    """Names under which an adapter's module may appear in the base: as is; without a diffusers
    component prefix; without the first part (an adapter made on BertForX merged into BertModel)."""
    rest = name.partition(".")[2]
    return [name, rest] if rest else [name]


def _match(ad: Adapter, base_weights: set[str], base_all: set[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Map each target to a base weight tensor and each saved tensor to a base tensor name."""
    tmap: dict[str, str] = {}
    unmatched: list[str] = []
    for m in ad.targets:
        hit = next((c + ".weight" for c in _candidates(m) if c + ".weight" in base_weights), None)
        if hit is None:
            unmatched.append(m)
        else:
            tmap[m] = hit
    smap: dict[str, str] = {}
    for n in ad.modules_to_save:
        smap[n] = next((c for c in _candidates(n) if c in base_all), n)
    return tmap, smap, unmatched


def _select_component(ad: Adapter, label: str, path: str | Path | None, component: str | None, base_weights: set[str],
                      names: set[str], shape_of: Callable[[str], tuple[int, ...]]) -> tuple[Adapter, dict[str, int]]:
    """An adapter for several parts of a pipeline (kohya ``lora_unet_`` / ``lora_te1_`` /
    ``lora_te2_``, diffusers ``unet.`` / ``text_encoder.``) merged into one part's weights keeps
    the targets of that part: ``component`` when given, else the one part whose targets all fit
    the base (names and shapes). SDXL's two text encoders have layers of the same names: when
    both fit, the user must say which. Targets that name no part are always kept. Returns the
    adapter and {skipped component: its number of targets}.

    Raises:
        MatchError: several parts fit and none was named (``_plan`` checks that ``component`` is
            one of the adapter's parts, before kohya names are resolved).
    """
    parts = adapter_parts(ad)
    named = sorted(c for c in parts if c is not None)
    if component is None and len(named) <= 1:
        return ad, {}
    if all(m + ".weight" in base_weights for m in ad.targets):  # a whole pipeline's weights, prefixes and all
        return ad, {}
    if component is not None:
        keep = component
    else:
        fits = []
        for c in named:
            sub = replace(ad, targets={m: ad.targets[m] for m in parts[c]}, modules_to_save={})
            tmap, _, unmatched = _match(sub, base_weights, names)
            if tmap and not unmatched and all(tuple(sub.targets[m].delta_shape()) == tuple(shape_of(wn))
                                              for m, wn in tmap.items()):
                fits.append(c)
        if len(fits) > 1:
            raise MatchError(f"{label} holds LoRA for {', '.join(fits)}, and each fits the base's weights (SDXL's two text "
                             f"encoders have layers of the same names): say which one the base is with --component "
                             f"({' or '.join(fits)})", path)
        if not fits:
            return ad, {}  # the usual unmatched / shape errors follow
        keep = fits[0]
    return keep_part(ad, keep, label, path)


def _as_classifier_folder(base: Path, added: list[str], saved: dict[str, torch.Tensor], adapters: Sequence[str | Path],
                          names: set[str]) -> tuple[dict[str, str], str, str] | None:
    """When adapters add a sequence-classification head (``classifier.*`` / ``score.*`` as
    modules_to_save) to a Hugging Face folder of the bare encoder: (the renames that give the
    encoder's tensors the classifier's prefix, the classifier's config.json, its class name).
    None otherwise, or when transformers cannot build that classifier."""
    heads = {n.split(".", 1)[0] for n in added}
    if (not added or not heads <= {"classifier", "score", "pre_classifier", "classification_head"}
            or not (base / "config.json").is_file()):
        return None
    config_dict = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if head_size(config_dict) is not None:
        return None
    # the head's output layer: its narrowest matrix (classifier.weight; RoBERTa's and BART's out_proj)
    mats = [saved[n] for n in added if n.endswith(".weight") and saved[n].ndim == 2]
    weight = min(mats, key=lambda t: int(t.shape[0])) if mats else None
    if weight is None:
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(base, local_files_only=True, num_labels=int(weight.shape[0]))
        with torch.device("meta"):
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    except Exception:  # noqa: BLE001 - no classifier class for this model type: leave the folder as it is
        return None
    prefix = getattr(model, "base_model_prefix", "")
    own = set(model.state_dict())
    rename = {n: f"{prefix}.{n}" for n in names if prefix and f"{prefix}.{n}" in own and n not in own}
    classes = _class_names(adapters, int(weight.shape[0]))
    cfg = {**config_dict, "architectures": [type(model).__name__],
           "id2label": {str(i): c for i, c in enumerate(classes)}, "label2id": {c: i for i, c in enumerate(classes)}}
    cfg.pop("num_labels", None)
    return rename, json.dumps(cfg, indent=2, sort_keys=True) + "\n", type(model).__name__


def _class_names(adapters: Sequence[str | Path], n: int) -> list[str]:
    """The class names attach recorded in an adapter's metrics.json, else LABEL_0, LABEL_1, ..."""
    for a in adapters:
        f = Path(a) / "metrics.json"
        try:
            classes = json.loads(f.read_text(encoding="utf-8")).get("classes") if f.is_file() else None
        except (OSError, ValueError):
            classes = None
        if isinstance(classes, list) and len(classes) == n and len(set(map(str, classes))) == n:
            return [str(c) for c in classes]
    return [f"LABEL_{i}" for i in range(n)]


def _check_weights(n: int, weights: Sequence[float] | float | None) -> list[float]:
    """One finite weight per adapter (default 1 each), within float32's range."""
    if not n:
        raise InvalidOptionError("give at least one adapter")
    given = one_or_many(weights)
    w = [1.0] * n if not given else [float(x) for x in given]
    if len(w) != n:
        raise InvalidOptionError(f"give one --weight per adapter: {n} adapters, {len(w)} weights")
    if not all(math.isfinite(x) and abs(x) <= lora.FP32_MAX for x in w):
        raise InvalidOptionError(f"weights must be finite numbers within float32's range, got {w}")
    return w


def _on_saved(parts: Sequence[tuple[LoraTarget, float, int]], saved: bool) -> list[tuple[LoraTarget, float]]:
    """(target, weight) pairs for one base weight. When the adapter saved that weight itself
    (peft's ``save_embedding_layers``), a base-changing initialisation is already in it: peft
    saves the weight as the initialisation left it, and loads it over the one it changed."""
    return [(replace(t, init=None) if saved and t.init else t, wi) for t, wi, _ in parts]


# The layers transformers builds as Conv1D in GPT-2, OpenAI GPT, ImageGPT and Decision
# Transformer; GPT-BigCode names its nn.Linear layers the same way.
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")


def _conv1d_layout(names: set[str], shape_of: Callable[[str], tuple[int, ...]]) -> bool | None:
    """Whether the base stores its Conv1D-named layers (in, out), as GPT-2's Conv1D does (True),
    or (out, in), as GPT-BigCode's nn.Linear layers do (False); None when the base does not say.
    Read from the layers that widen the hidden size (``c_attn`` to q, k, v; ``c_fc`` to the MLP):
    stored (in, out) they have fewer rows than columns."""
    votes = set()
    for n in names:
        if n.endswith((".c_attn.weight", ".c_fc.weight")):
            shape = tuple(shape_of(n))
            if len(shape) == 2 and shape[0] != shape[1]:
                votes.add(shape[0] < shape[1])
    return votes.pop() if len(votes) == 1 else None


def _orient(ad: Adapter, tmap: Mapping[str, str], names: set[str], shape_of: Callable[[str], tuple[int, ...]],
            label: str, path: str | Path | None, warn: Callable[[str], None] | None) -> Adapter:
    """Each Linear target's orientation as peft has it. PEFT's ``fan_in_fan_out`` is one flag per
    adapter, but peft sets it per module by the module's type (GPT-2's Conv1D stores its weight
    (in, out)), warning when the config says otherwise; a config saved from an adapter on both
    kinds (Conv1D layers and a Linear ``lm_head``) holds whichever came last. So in an adapter for
    such a model (a target named like GPT-2's Conv1D layers), each target's layout comes from the
    base: Conv1D-named layers as the base's widening layers show (``_conv1d_layout``), the others
    (``lm_head``, ``score``) as Linear; without that evidence, a weight that is not square shows
    its own layout, and a square one whose flag was proven wrong elsewhere is refused by name.
    Elsewhere a transposed shape means the wrong base, and stays an error.

    Raises:
        UnsupportedError: a square target whose layout nothing can tell.
    """
    if not any(m.rsplit(".", 1)[-1] in _CONV1D_NAMES for m in ad.targets):
        return ad  # not a GPT-2-style model: a transposed shape is the wrong base, and stays an error
    layout = _conv1d_layout(names, shape_of)
    changed, square = [], []
    targets = dict(ad.targets)
    for m, wname in tmap.items():
        t = targets[m]
        bshape = tuple(shape_of(wname))
        if t.is_conv or len(bshape) != 2:
            continue
        if layout is not None:
            fifo = layout and m.rsplit(".", 1)[-1] in _CONV1D_NAMES
        elif bshape[0] == bshape[1]:
            square.append(m)
            continue
        else:
            fifo = tuple(replace(t, fan_in_fan_out=True).delta_shape()) == bshape
        if fifo != t.fan_in_fan_out:
            targets[m] = replace(t, fan_in_fan_out=fifo)
            changed.append(m)
    if not changed:
        return ad
    if square:
        raise UnsupportedError(
            f"the adapter's fan_in_fan_out flag ({ad.targets[changed[0]].fan_in_fan_out}) is wrong for {changed[0]!r}, whose "
            f"base weight is stored the other way, so it cannot tell how the square weight of {square[0]!r} is stored "
            "(peft decides by the module's type)", path)
    if warn:
        warn(f"{label}: fan_in_fan_out taken from the base's layout for {len(changed)} target(s) (e.g. {changed[0]}), "
             "as peft does by module type: the adapter's config says otherwise")
    return replace(ad, targets=targets)


def _plan(
    ads: Sequence[tuple[Adapter, str, str | Path | None]], w: Sequence[float], names: set[str],
    shape_of: Callable[[str], tuple[int, ...]], *, unmerge: bool, allow_unmatched: bool,
    warn: Callable[[str], None] | None, where: str | Path | None, what: str, component: str | None = None,
    skipped: dict[str, int] | None = None,
) -> tuple[dict[str, list[tuple[LoraTarget, float, int]]], dict[str, torch.Tensor], list[str]]:
    """Which adapter part goes where, every check done before anything is computed or written:
    each target's base weight (shape-checked; a LoRA bias needs a base bias; weight × scale within
    float32), each ``modules_to_save`` tensor's base name (two different replacements of one tensor
    are refused), unmatched targets (an error unless ``allow_unmatched``; none matching at all is
    always one). ``ads``: (adapter, its name for messages, its path or None). Each adapter keeps
    the targets of the base's pipeline component (``_select_component``); the targets set aside
    are counted into ``skipped`` ({"adapter: component": count}) and warned about.

    Returns:
        (weight name -> [(target, weight, adapter index)], base name -> replacing tensor,
        the unmatched targets as "adapter: module").
    """
    base_weights = {n for n in names if n.endswith(".weight")}
    base_modules = sorted(n[: -len(".weight")] for n in base_weights)
    per_weight: dict[str, list[tuple[LoraTarget, float, int]]] = {}
    saved: dict[str, torch.Tensor] = {}
    saved_from: dict[str, str] = {}
    problems: list[str] = []
    unmatched_all: list[str] = []
    if component is not None and component not in DIFFUSERS_COMPONENTS:
        raise InvalidOptionError(f"--component must be one of {', '.join(DIFFUSERS_COMPONENTS)}, got {component!r}")
    for i, ((ad, label, path), wi) in enumerate(zip(ads, w, strict=True)):
        if component is not None:  # checked on the stems, which name their part before names are resolved
            keep_part(ad, component, label, path)
        if warn and dylora_note(ad, label):
            warn(dylora_note(ad, label))  # type: ignore[arg-type]
        if ad.format == "kohya":
            ad, _, _ = resolve_kohya_names(ad, base_modules)
        ad, set_aside = _select_component(ad, label, path, component, base_weights, names, shape_of)
        for c, count in set_aside.items():
            if skipped is not None:
                skipped[f"{label}: {c}"] = count
            if warn:
                warn(f"{label}: skipping its {count} {c} target(s): they are for another part of the pipeline")
        if unmerge and ad.modules_to_save:
            raise UnsupportedError("unmerging cannot restore tensors an adapter replaced (modules_to_save)", path)
        tmap, smap, unmatched = _match(ad, base_weights, names)
        mha = next((m for m in unmatched if any(c + ".in_proj_weight" in names for c in _candidates(m))), None)
        if mha is not None and not allow_unmatched:  # PEFT's LoRA on nn.MultiheadAttention adapts in_proj_weight
            raise UnsupportedError(f"{mha!r} is an nn.MultiheadAttention (it has in_proj_weight): LoRA on "
                                   "MultiheadAttention modules is not supported", path)
        # output layers that transformers ties to the input embeddings: lm_head (GPT-2, LLaMA, T5's
        # to `shared`), BERT's masked-LM decoder (cls.predictions.decoder)
        tied = next((m for m in unmatched if (m.rsplit(".", 1)[-1] == "lm_head" or m.endswith("predictions.decoder"))
                     and any(n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight"))
                             for n in names)), None)
        if tied is not None and not allow_unmatched:  # a tied output layer's weight is stored once, as the embeddings
            raise UnsupportedError(f"{tied!r} has no weight of its own in the base: it is tied to the input embeddings, "
                                   "and a LoRA on tied weights (which changes both) is not supported", path)
        unmatched_all += [f"{label}: {m}" for m in unmatched]
        ad = _orient(ad, tmap, names, shape_of, label, path, warn)
        for m, wname in tmap.items():
            t = ad.targets[m]
            bshape = shape_of(wname)
            if tuple(t.delta_shape()) != tuple(bshape):
                problems.append(f"{label}: {m} (adapter {list(t.delta_shape())} vs {what} {list(bshape)})")
                continue
            if t.bias is not None and bool(t.bias.any()) and wname[: -len(".weight")] + ".bias" not in names:
                # (an all-zero LoRA bias is PEFT's lora_bias switch on a target that has none: nothing to add)
                problems.append(f"{label}: {m} (LoRA bias but the base layer has no bias)")
                continue
            if not abs(wi * t.scale) <= lora.FP32_MAX:  # the fp32 update would overflow
                raise InvalidOptionError(f"--weight {wi:g} times the adapter's scale {t.scale:g} for {m!r} overflows "
                                         "float32", path)
            per_weight.setdefault(wname, []).append((t, wi, i))
        for n, bn in smap.items():
            new = ad.modules_to_save[n]
            if bn in names and tuple(shape_of(bn)) != tuple(new.shape):
                problems.append(f"{n} (saved {list(new.shape)} vs {what} {list(shape_of(bn))})")
            if bn in saved and not (saved[bn].shape == new.shape and torch.equal(saved[bn], new)):
                raise UnsupportedError(
                    f"{saved_from[bn]} and {label} both replace {bn!r} (modules_to_save) with different "
                    "tensors; a merge cannot add replacements: merge one of them, or compose them first", path)
            saved[bn], saved_from[bn] = new, label
        if smap and wi != 1 and warn:
            warn(f"--weight {wi:g} does not scale {label}'s modules_to_save "
                 f"({', '.join(sorted(smap)[:3])}{', ...' if len(smap) > 3 else ''}): they replace the base tensors whole")
    if problems:
        raise MatchError(f"{len(problems)} adapter target(s) do not fit {what}: " + "; ".join(problems[:10]), where)
    if unmatched_all and not allow_unmatched:
        raise MatchError(
            f"{len(unmatched_all)} adapter target(s) match no base weight: " + ", ".join(unmatched_all[:10])
            + ("" if len(unmatched_all) <= 10 else ", ...") + " (pass --allow-unmatched to skip them)", where)
    if not per_weight and not saved:
        raise MatchError("no adapter target matches a base weight: the adapters are not for this model", where)
    if unmatched_all and warn:
        warn(f"skipping {len(unmatched_all)} unmatched target(s): " + ", ".join(unmatched_all[:10]))
    for parts in per_weight.values():  # DoRA rules, and those of base-changing initialisations (PiSSA...)
        try:
            lora.check_dora([(t, wi) for t, wi, _ in parts], unmerge=unmerge)
        except UnsupportedError as e:  # name the (first) DoRA adapter's file
            e.path = str(ads[next((i for t, _, i in parts if t.magnitude is not None), parts[0][2])][2])
            raise
        try:
            lora.check_init([(t, wi) for t, wi, _ in parts], unmerge=unmerge)
        except UnsupportedError as e:
            e.path = str(ads[next((i for t, _, i in parts if t.init), parts[0][2])][2])
            raise
    return per_weight, saved, unmatched_all


def merge_adapters(
    base: str | Path,
    adapters: Sequence[str | Path],
    out: str | Path | None,
    *,
    weights: Sequence[float] | None = None,
    unmerge: bool = False,
    allow_unmatched: bool = False,
    component: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
) -> MergeResult:
    """W' = W + Σ_i w_i s_i B_i A_i per targeted weight (fp32 accumulate, cast back once to the base
    dtype); LoRA biases added; DoRA applied; modules_to_save replace (or add) base tensors.

    Args:
        base: checkpoint or model folder (a folder in gives a folder out).
        adapters: PEFT, kohya/LoCon or diffusers LoRAs; kohya names are resolved against the base.
        weights: one per adapter (default 1 each).
        unmerge: subtract plain LoRA instead (DoRA and modules_to_save cannot be unmerged).
        allow_unmatched: unmatched targets become a warning instead of an error.
        component: which part of a pipeline the base is (unet, text_encoder, text_encoder_2, ...),
            for adapters that hold LoRA for several; by default the one part whose targets fit.
            The other parts' targets are skipped and counted in ``extra["skipped_components"]``.

    Raises:
        MatchError: targets that match no base weight, or whose shape differs (listed), nothing written.
        UnsupportedError: DoRA weighting/unmerging/combining, LoHa/LoKr/OFT inputs, a factorized base.
    """
    adapters = one_or_many(adapters) or []
    w = _check_weights(len(adapters), weights)
    require_output(out, dry_run)
    if out is not None and not dry_run:
        check_output(out, force, [base, *adapters], directory=Path(base).is_dir())
    base = Path(base)
    said: list[str] = []

    def note(message: str) -> None:
        said.append(message)
        if warn:
            warn(message)

    with Checkpoint.open(base) as ck:
        refuse_adapter(base, ck, "a base model", "give the model the adapters are for first, then the adapters; "
                       "to combine adapters use lorasurgeon compose")
        if factorized_layers(ck.metadata, base):
            raise UnsupportedError("the base is a factorized checkpoint; densify it first (factorize --densify)", base)
        if base.is_dir() and not dry_run:
            check_folder_name(out)
        names = set(ck.names())
        skipped: dict[str, int] = {}
        per_weight, saved, unmatched_all = _plan(
            [(read_adapter(p), Path(p).name, p) for p in adapters], w, names, lambda n: tuple(ck.info(n).shape),
            unmerge=unmerge, allow_unmatched=allow_unmatched, warn=note, where=base, what="the base",
            component=component, skipped=skipped)
        bias_parts = {wn[: -len(".weight")] + ".bias": parts for wn, parts in per_weight.items()
                      if any(t.bias is not None for t, _, _ in parts)}
        added = sorted(n for n in saved if n not in names)
        replaced = sorted(n for n in saved if n in names)
        tied = tied_input_embedding(base) if base.is_dir() and saved else None
        if tied is not None and tied in saved:
            raise UnsupportedError(
                f"the adapters replace {tied!r} (modules_to_save), the input embeddings that this model's output layer "
                "shares (tie_word_embeddings): the merged folder would change the output layer too, where peft keeps "
                "the original one; merging such an adapter is not supported", base)
        # A new classification head (attach on a bare encoder) merged into that encoder's folder:
        # the folder becomes the classifier's, or transformers and export would drop the head.
        head = _as_classifier_folder(base, added, saved, adapters, names) if base.is_dir() else None
        rename = head[0] if head else {}
        specs = [TensorSpec(rename.get(n, n), ST_DTYPES[ck.info(n).dtype], ck.info(n).shape) for n in ck.names()]
        specs += [TensorSpec(n, saved[n].dtype, tuple(saved[n].shape)) for n in added]
        layers: list[MergeLayer] = []
        result = MergeResult(SCHEMA, str(base), [str(a) for a in adapters], w, None if dry_run else str(out), unmerge,
                             dry_run, layers, replaced, added, unmatched_all, warnings=said)
        if skipped:
            result.extra["skipped_components"] = skipped
        if dry_run:
            for wn, parts in sorted(per_weight.items()):
                layers.append(MergeLayer(wn[: -len(".weight")], list(ck.info(wn).shape), [i for _, _, i in parts],
                                         float("nan"), float("nan")))
            return result

        # Reused buffers for the merged weights: one to read each base weight into, and two that
        # take turns receiving W'. The writer keeps at most the last tensor it was given when it
        # asks for the next one (io/writer.py::_write_stream), so when W'_{k+2} is computed into
        # the slot of W'_k, W'_k is on disk. Fresh 64 MB tensors per layer cost a page fault per
        # 4 KB page: measured 8-9 s of system time on a 2 GB merge, against 4.7 s with reuse.
        big = max((ck.info(n).nbytes for n in per_weight), default=0)
        in_buf = torch.empty(big, dtype=torch.uint8)
        ring = [torch.empty(big, dtype=torch.uint8) for _ in range(2)] if per_weight else []

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            todo = ck.names()
            k = 0
            for j, n in enumerate(todo):
                if progress:
                    progress(j, len(todo), n)
                if n in saved and n not in per_weight and n not in bias_parts:
                    yield n, saved[n].to(ST_DTYPES[ck.info(n).dtype])
                    continue
                if n in per_weight:
                    if n in saved:  # the adapter saved the base layer's weight (PEFT's embedding layers): LoRA on it
                        t, slot = saved[n].to(ST_DTYPES[ck.info(n).dtype]), None
                    else:
                        t = ck.get(n, into=in_buf)
                        slot = ring[k % 2][: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                        k += 1
                    parts = per_weight[n]
                    try:
                        new, st = lora.merge_weight_stats(t, _on_saved(parts, n in saved), unmerge=unmerge, name=n,
                                                          out=slot)
                    except FormatError as e:
                        raise FormatError(str(e), base) from None
                    layers.append(MergeLayer(n[: -len(".weight")], list(t.shape), [i for _, _, i in parts],
                                             st.update_norm,
                                             st.update_norm / st.base_norm if st.base_norm > 0 else float("inf")))
                    del t
                    yield n, new
                    continue
                # fresh memory: the writer may still hold it when the next tensor is read; a trained
                # bias the adapter saved (PEFT's bias="all") gets the LoRA bias on top, as in peft
                t = saved[n].to(ST_DTYPES[ck.info(n).dtype]) if n in saved else ck.get(n)
                if n in bias_parts:
                    yield n, lora.merge_bias(t, [(p, wi) for p, wi, _ in bias_parts[n]], unmerge=unmerge)
                else:
                    yield n, t
            for n in added:
                yield n, saved[n]
            if progress:
                progress(len(todo), len(todo), "")

        meta: dict[str, Any] = {k: v for k, v in ck.metadata.items() if k != METADATA_KEY}
        opts = {"weights": w, "unmerge": unmerge, "allow_unmatched": allow_unmatched}
        prov = DeferredProvenance("merge", opts, [base, *adapters], extra={"format": "dense"})
        meta[METADATA_KEY] = prov.placeholder
        write_like_input(ck, base, Path(out), specs, ((rename.get(n, n), t) for n, t in stream()), meta, force,
                         final_metadata=lambda: {**meta, METADATA_KEY: prov.result()},
                         replace_files={"config.json": head[1]} if head else None)
        if head:
            result.extra["config"] = head[2]
    layers.sort(key=lambda x: x.module)
    return result


def merge_state_dict(
    state: Mapping[str, torch.Tensor],
    adapters: Sequence[Adapter | str | Path] | Adapter | str | Path,
    *,
    weights: Sequence[float] | float | None = None,
    unmerge: bool = False,
    allow_unmatched: bool = False,
    component: str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge adapters into a state dict you hold: the in-memory ``merge_adapters``.

    The same arithmetic (W' = W ± Σ w_i s_i B_i A_i in fp32, fp64 for fp64 weights, cast back
    once; LoRA biases; DoRA; ``modules_to_save`` replace or add tensors) and the same name
    matching (an adapter's module ``m`` fits ``m.weight``, or the name without its first part).
    Nothing is written and ``state`` is not changed: the result is a new dict whose untouched
    entries are the caller's tensors (not copies); ``modules_to_save`` tensors are copies (in the
    dtype of the tensor they replace). Load it with ``model.load_state_dict``.

    Args:
        state: tensor name -> tensor (e.g. ``model.state_dict()``).
        adapters: ``Adapter`` objects or adapter paths (one, or a sequence).
        weights: one per adapter (default 1).
        component: as in ``merge_adapters`` (the other parts' targets are skipped silently here).

    Returns:
        The merged state dict.

    Raises:
        MatchError: a target matches no tensor (unless ``allow_unmatched``; none matching is always
            an error) or does not fit its shape. UnsupportedError: the DoRA cases of merge.
        InvalidOptionError: the weight count, or non-finite weights.
    """
    ads = [(a, a.source or f"adapter {i + 1}", a.source) if isinstance(a, Adapter) else (read_adapter(a), Path(a).name, a)
           for i, a in enumerate(one_or_many(adapters) or [])]
    w = _check_weights(len(ads), weights)
    per_weight, saved, _ = _plan(ads, w, set(state), lambda n: tuple(state[n].shape), unmerge=unmerge,
                              allow_unmatched=allow_unmatched, warn=None, where=None, what="the state dict",
                              component=component)
    out = dict(state)
    # as merge_adapters: a replaced tensor takes the state's dtype; all are new tensors, not the
    # adapter's; a replaced weight or bias that is also a LoRA target gets the update on top
    out.update({n: v.to(state[n].dtype, copy=True) if n in state else v.clone() for n, v in saved.items()})
    for wname, trio in per_weight.items():
        parts = _on_saved(trio, wname in saved)
        out[wname] = lora.merge_weight(out[wname], parts, unmerge=unmerge, name=wname)
        bname = wname[: -len(".weight")] + ".bias"
        if any(t.bias is not None for t, _ in parts) and bname in out:
            out[bname] = lora.merge_bias(out[bname], parts, unmerge=unmerge)
    return out
