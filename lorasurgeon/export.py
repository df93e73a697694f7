"""``export``: a model lorasurgeon can load → one verified ONNX file, optionally optimized,
quantized and benchmarked against PyTorch and against a dense baseline.

Pipeline (every step works on files staged in a hidden folder beside the output; nothing
appears at the output path until verification has passed):

1. Resolve the model (``nn.models.load_model``: Hugging Face folder with eager attention,
   ``--arch module:factory`` + weights, factorized checkpoints rebuilt from their metadata).
2. Merge adapters into the in-memory weights (W' = W + s·B·A, fp32, ``ops.lora.merge_weight``),
   or, with ``separate_adapters``, keep each adapter apart as an onnxruntime ``.onnx_adapter``.
3. Export with the TorchScript exporter (``torch.onnx.export(dynamo=False)``): measured here it
   is 5x faster than the dynamo exporter on MiniLM, byte-deterministic, and its graph is the one
   onnxruntime's BERT optimizer fuses into Attention (the dynamo graph is not). Dynamic batch
   and sequence axes. Factorized layers stay two thin MatMuls (x·Vᵀ then ·Uᵀ).
4. Optional graph optimization (onnxruntime's transformer fusions for BERT-like encoders,
   otherwise onnxruntime's extended graph optimizations saved into the file), fp16 conversion
   (inputs and outputs stay fp32) and int8 dynamic quantization.
5. Verification: onnxruntime (CUDA when present, else CPU) against the PyTorch model on several
   inputs of different batch sizes and lengths; max |Δ| above ``atol`` raises
   ``VerificationError`` (exit 3) and nothing is written. A quantized file is gated by task
   agreement instead (mean cosine of embeddings, top-1 agreement of logits).
6. Optional benchmark: PyTorch eager and onnxruntime latency (median, p90) at a fixed batch and
   length, interleaved run by run with the baseline model when one is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorasurgeon._args import one_or_many
from lorasurgeon._finite import json_safe
from lorasurgeon._threads import torch_threads
from lorasurgeon.errors import (
    InvalidOptionError,
    LorasurgeonError,
    MatchError,
    UnsupportedError,
    VerificationError,
)
from lorasurgeon.io import writer
from lorasurgeon.io.adapters import Adapter, LoraTarget, dylora_note, read_adapter, resolve_kohya_names
from lorasurgeon.io.checkpoint import is_utf8
from lorasurgeon.io.writer import check_output, commit_files, provenance
from lorasurgeon.nn.layers import LowRankConv2d, LowRankLinear
from lorasurgeon.nn.models import LoadedModel, classifier_head_size, load_model, model_outputs
from lorasurgeon.ops import lora

SCHEMA = "lorasurgeon.export/1"
DEFAULT_OPSET = 17
OPSET_RANGE = (13, 20)  # the TorchScript exporter stops at 20
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2}
# Plus this fraction of the batch's largest |reference| output: fp16 keeps ~3 significant digits,
# so a fixed atol alone fails large logits (test_export.py::test_fp16_tolerance_scales_with_the_outputs).
DEFAULT_RTOL = {"fp32": 0.0, "fp16": 5e-3}
DEFAULT_AGREEMENT = {"embeddings": 0.99, "logits": 0.98}
# protobuf cannot serialize a message of 2 GiB or more; stay clear of it with the graph's own bytes.
EXTERNAL_DATA_BYTES = 2_000_000_000
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# onnxruntime.transformers.optimizer model types for the Hugging Face model_type values we fuse.
BERT_LIKE = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
             "electra": "bert", "camembert": "bert", "mpnet": "bert", "albert": "bert", "vit": "vit"}
METADATA_KEY = "lorasurgeon"
LogFn = Callable[[str], None]

# Realistic text for sample inputs (verification, agreement and benchmark batches).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A low-rank factorization replaces one large matrix with two thin ones.",
    "Stock markets closed higher on Friday after a volatile week of trading.",
    "The committee will publish its report on energy policy next spring.",
    "She played the opening movement slowly, letting every note ring out.",
    "Heavy rain is expected across the north, with strong winds along the coast.",
    "The new phone has a brighter screen, a faster chip and a larger battery.",
    "Researchers found that the vaccine remained effective for at least two years.",
    "He scored twice in the second half to give his team a surprise victory.",
    "Please remember to back up your files before installing the update.",
    "The museum's new wing houses a collection of early photographs.",
    "Interest rates were left unchanged, as analysts had widely predicted.",
    "The film follows a family who move to a small village in the mountains.",
    "Engineers are testing a bridge design that can withstand earthquakes.",
    "Our flight was delayed by three hours because of fog at the airport.",
    "The recipe calls for fresh basil, ripe tomatoes and a little olive oil.",
    "Voters in the region will elect a new governor in November.",
    "A good night's sleep improves memory, mood and concentration.",
    "The startup raised forty million dollars to expand into Europe.",
    "Scientists observed a distant galaxy forming stars at a remarkable rate.",
    "The library extended its opening hours during the examination period.",
    "Why does the sky look blue during the day and red at sunset?",
    "Traffic on the motorway was heavy all afternoon after an accident.",
    "The orchestra announced a season of works by living composers.",
)


# --------------------------------------------------------------------------- results
@dataclass
class VerifyCase:
    batch: int
    seq_len: int | None
    shape: list[int]  # of the first input
    max_abs_error: float
    max_rel_error: float  # max|Δ| / max|reference|
    ref_max_abs: float = 0.0  # max|reference|: the batch's tolerance is atol + rtol · this

    def tolerance(self, atol: float, rtol: float) -> float:
        return atol + rtol * self.ref_max_abs


@dataclass
class Verification:
    provider: str
    reference: str  # what onnxruntime was compared with
    atol: float
    max_abs_error: float
    max_rel_error: float
    passed: bool
    cases: list[VerifyCase]
    rtol: float = 0.0

    def failure(self) -> str:
        """``max |diff| D > atol A [+ rtol R × max|ref| M] (at input ...)`` for the worst batch."""
        worst = max(self.cases, key=lambda c: c.max_abs_error - c.tolerance(self.atol, self.rtol))
        tol = f"atol {self.atol:g}" + (f" + rtol {self.rtol:g} × max|ref| {worst.ref_max_abs:.3g}" if self.rtol else "")
        return f"max |diff| {worst.max_abs_error:.3g} > {tol} (at input {'x'.join(map(str, worst.shape))})"


@dataclass
class Agreement:
    metric: str  # "mean_cosine" (embeddings) | "top1_agreement" (logits)
    value: float
    min: float
    samples: int
    passed: bool
    max_abs_error: float


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    runs: int


@dataclass
class BaselineResult:
    model: str
    bytes: int
    verification: Verification
    pytorch: Timing | None = None
    onnxruntime: Timing | None = None


@dataclass
class Benchmark:
    batch_size: int
    seq_len: int | None
    threads: int
    warmup: int
    runs: int
    provider: str
    pytorch: Timing
    onnxruntime: Timing
    onnxruntime_vs_pytorch: float  # pytorch median / onnxruntime median
    load_average: list[float]  # os.getloadavg() before and after (1-minute values)
    baseline: BaselineResult | None = None
    speedup_vs_baseline: float | None = None  # baseline onnxruntime median / ours
    pytorch_speedup_vs_baseline: float | None = None


@dataclass
class ExportResult:
    schema: str
    model: str | None
    arch: str | None
    kind: str  # "text" | "tensor"
    output: str
    external_data: str | None
    bytes: int  # the .onnx file plus its external data
    sha256: str
    opset: int
    dtype: str
    exporter: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    factorized_layers: int
    matmul_nodes: int  # MatMul + Gemm in the exported graph, before any optimization
    nodes: int
    adapters: list[str]
    adapter_mode: str | None  # "merged" | "separate" | None
    adapter_files: list[str]
    optimized: str | None  # the optimizer used, None when not asked
    fused_ops: dict[str, int]
    quantized: str | None
    verification: Verification
    agreement: Agreement | None = None
    benchmark: Benchmark | None = None
    adapter_verification: list[Verification] = field(default_factory=list)  # one per .onnx_adapter
    warnings: list[str] = field(default_factory=list)  # each also logged ("warning: ...") as it happens

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


# --------------------------------------------------------------------------- inputs
@dataclass
class InputSpec:
    """How to feed the model: named text inputs (dynamic batch and sequence) or one tensor
    with a per-sample shape (dynamic batch; dynamic spatial axes too when the model runs at
    two sizes, as fully convolutional nets with global pooling do)."""

    kind: str  # "text" | "tensor"
    names: list[str]
    sample_shape: tuple[int, ...] = ()
    tokenizer: Any = None
    vocab_size: int = 0
    max_len: int = 512
    pad_id: int = 0
    spatial: bool = False  # tensor axes after the channel axis are dynamic

    def _axis_names(self) -> dict[int, str]:
        axes = {0: "batch"}
        if self.kind == "text":
            axes[1] = "sequence"
        elif self.spatial:
            rest = len(self.sample_shape) - 1
            names = ["height", "width"] if rest == 2 else ["length"] if rest == 1 else [f"dim{i}" for i in range(rest)]
            axes.update({2 + i: nm for i, nm in enumerate(names)})
        return axes

    def dynamic_axes(self, output: str) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {n: self._axis_names() for n in self.names}
        axes[output] = {0: "batch"}
        return axes

    def describe(self) -> list[dict[str, Any]]:
        if self.kind == "text":
            return [{"name": n, "shape": ["batch", "sequence"], "dtype": "int64"} for n in self.names]
        named = self._axis_names()
        shape = [named.get(i + 1, d) for i, d in enumerate(self.sample_shape)]
        return [{"name": n, "shape": ["batch", *shape], "dtype": "float32"} for n in self.names]

    def alternative_shape(self) -> tuple[int, ...]:
        """Another spatial size, to check (and then verify) dynamic spatial axes."""
        c, *rest = self.sample_shape
        return (c, *[d // 2 if min(rest) >= 16 else d * 2 for d in rest])

    def make(self, batch: int, seq_len: int | None, seed: int, full: bool = False,
             shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """A deterministic batch. Text rows have different real lengths (padding inside the
        batch) unless ``full``; tensors are standard normal (of ``shape`` when given)."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "tensor":
            return {self.names[0]: torch.randn(batch, *(shape or self.sample_shape), generator=g)}
        seq = max(2, min(int(seq_len or 16), self.max_len))
        lengths = [seq if full or i == 0 else int(torch.randint(2, seq + 1, (1,), generator=g)) for i in range(batch)]
        if self.tokenizer is not None:
            feats = []
            for n in lengths:
                idx = torch.randperm(len(SENTENCES), generator=g).tolist()
                text = " ".join(SENTENCES[i] for i in idx)
                while len(text.split()) < seq * 2:
                    text = text + " " + text
                feats.append(self.tokenizer(text, max_length=n, truncation=True))
            enc = self.tokenizer.pad(feats, padding="max_length", max_length=seq, return_tensors="pt")
            out = {n: enc[n].to(torch.int64) if n in enc else torch.zeros(batch, seq, dtype=torch.int64) for n in self.names}
            if "attention_mask" in out:  # a tokenizer may pad on the left; either way it matches input_ids
                out["attention_mask"] = enc["attention_mask"].to(torch.int64)
            return out
        ids = torch.randint(1, max(2, self.vocab_size), (batch, seq), generator=g)
        mask = torch.zeros(batch, seq, dtype=torch.int64)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_id))
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {n: feed[n] for n in self.names}


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,8,8"`` or ``"1x8x8"`` (one sample, without the batch axis) → (1, 8, 8).

    Raises:
        InvalidOptionError: not a list of positive integers.
    """
    parts = [p.strip() for p in text.replace("x", ",").replace("×", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InvalidOptionError(
            f"--input-shape must be positive integers separated by commas, one sample without the batch axis (e.g. 1,8,8), got {text!r}")
    return shape


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d, LowRankLinear, LowRankConv2d)):
            return m
    return None


def _runs(model: nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *shape))
        return True
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False


def _infer_sample_shape(lm: LoadedModel) -> tuple[int, ...]:
    """The per-sample input shape of an ``--arch`` model, from its first layer: a Linear gives
    (in_features,), a conv gives (channels, s, s) for the first common image size s that runs
    (224 first: a model that runs at any size is exported with dynamic spatial axes anyway)."""
    shape = getattr(lm.model, "input_shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    first = _first_layer(lm.model)
    cands: list[tuple[int, ...]] = []
    if isinstance(first, (nn.Linear, LowRankLinear)):
        cands = [(first.in_features,)]
    elif isinstance(first, (nn.Conv2d, LowRankConv2d)):
        cands = [(first.in_channels, s, s) for s in (224, 32, 28, 8, 64, 96, 128, 256, 299, 16)]
    elif isinstance(first, nn.Conv1d):
        cands = [(first.in_channels, s) for s in (16000, 1024, 256, 128, 64)]
    for c in cands:
        if _runs(lm.model, c):
            return c
    raise InvalidOptionError(f"cannot infer the input shape of {lm.arch}; pass --input-shape (one sample, e.g. 3,224,224)")


def input_spec(lm: LoadedModel, input_shape: Sequence[int] | None) -> InputSpec:
    """Decide the graph's inputs from the model kind (text encoder, vision model, --arch module)."""
    if lm.kind == "module":
        shape = tuple(input_shape) if input_shape else _infer_sample_shape(lm)
        if input_shape and not _runs(lm.model, shape):
            raise InvalidOptionError(f"the model does not run on inputs of shape (batch, {', '.join(map(str, shape))}); check --input-shape")
        return _with_spatial(InputSpec("tensor", ["x"], shape), lm.model)
    cfg = lm.model.config
    params = inspect.signature(lm.model.forward).parameters
    if "input_ids" in params:
        if input_shape:
            raise InvalidOptionError("--input-shape is for tensor inputs; a text model takes --seq-len (batch and sequence axes are dynamic)")
        names = [n for n in TEXT_INPUTS if n in params]
        if lm.tokenizer is not None:
            allowed = set(getattr(lm.tokenizer, "model_input_names", TEXT_INPUTS))
            names = [n for n in names if n in allowed or n == "input_ids"]
        elif "token_type_ids" in names and not getattr(cfg, "type_vocab_size", 0):
            names.remove("token_type_ids")
        max_len = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            max_len -= 2  # positions start after the padding index
        pad = getattr(lm.tokenizer, "pad_token_id", None) if lm.tokenizer is not None else None
        pad = pad if pad is not None else (getattr(cfg, "pad_token_id", 0) or 0)
        return InputSpec("text", names, (), lm.tokenizer, int(getattr(cfg, "vocab_size", 2) or 2), max_len, int(pad))
    if "pixel_values" in params:
        if input_shape:
            shape = tuple(input_shape)
        else:
            size = getattr(cfg, "image_size", None)
            size = size if isinstance(size, (list, tuple)) else (size, size)
            if size[0] is None:
                raise InvalidOptionError("cannot tell the image size from config.json; pass --input-shape (e.g. 3,224,224)")
            shape = (int(getattr(cfg, "num_channels", 3)), int(size[0]), int(size[1]))
        return _with_spatial(InputSpec("tensor", ["pixel_values"], shape), lm.model)
    raise UnsupportedError(f"cannot tell the inputs of {type(lm.model).__name__}: export supports text encoders "
                           "(input_ids) and vision models (pixel_values), or --arch modules", lm.source)


def _with_spatial(spec: InputSpec, model: nn.Module) -> InputSpec:
    if len(spec.sample_shape) >= 2:
        spec.spatial = _runs(model, spec.alternative_shape())
    return spec


class _Exported(nn.Module):
    """The graph's function: positional inputs in ``names`` order → model_outputs (logits, or
    mean-pooled embeddings for a bare encoder)."""

    def __init__(self, lm: LoadedModel, names: Sequence[str]) -> None:
        super().__init__()
        self.lm = lm
        self.model = lm.model
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return model_outputs(self.lm, dict(zip(self.names, args)))


def output_name(lm: LoadedModel) -> str:
    return "logits" if lm.has_head else "embeddings"


def _reference(lm: LoadedModel, feed: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return model_outputs(lm, feed).float().numpy()


# --------------------------------------------------------------------------- model
def _adapter_head(adapters: Sequence[str | Path]) -> int | None:
    """Outputs of a new sequence-classification head an adapter carries as modules_to_save."""
    for a in adapters:
        saved = read_adapter(a).modules_to_save
        w = saved.get("classifier.weight", saved.get("score.weight"))
        if w is not None and w.ndim == 2:
            return int(w.shape[0])
    return None


def resolve(path: str | Path | None, arch: str | None, head: int | None = None) -> LoadedModel:
    """Load the model for export: eager attention (the graph onnxruntime's optimizer fuses).
    ``head``: the output count of a classification head that merged adapters bring to a bare
    encoder folder (modules_to_save ``classifier.*``)."""
    attn = "eager" if arch is None else None
    # a factory's initialisation: seed 0, never the caller's RNG, which is left as it was
    with torch.random.fork_rng(devices=[]):  # (load_model keeps transformers quiet itself)
        torch.manual_seed(0)
        # a classifier folder keeps its own head (load_model reads its config); a bare encoder
        # gets the head that merged adapters bring
        new_head = head if arch is None and classifier_head_size(path) is None else None
        lm = load_model(path, arch=arch, num_labels=new_head, attn_implementation=attn)
    # fp32 whatever the folder's dtype (transformers keeps an fp16/bf16 config's dtype): the
    # graph is fp32 and --dtype fp16 converts it afterwards; onnxruntime has no bf16 kernels
    lm.model.float().eval()
    return lm


def _candidates(name: str) -> list[str]:
    """merge.py's rule: as is; without the first part (a diffusers component or a model prefix
    such as ``bert.`` when the adapter was trained on a model with a head)."""
    rest = name.partition(".")[2]
    return [name, rest] if rest else [name]


def _module_name(model: nn.Module, target: str) -> str | None:
    prefix = getattr(model, "base_model_prefix", "")
    cands = _candidates(target)
    if prefix:
        cands.append(f"{prefix}.{target}")
    params = dict(model.named_parameters())
    return next((c for c in cands if c + ".weight" in params), None)


def _read_adapters(model: nn.Module, adapters: Sequence[str | Path], allow_unmatched: bool,
                   warn: LogFn) -> list[tuple[Path, Adapter, dict[str, str]]]:
    """Read each adapter and map its targets to the model's modules (kohya names resolved)."""
    params = dict(model.named_parameters())
    modules = sorted(n[: -len(".weight")] for n in params if n.endswith(".weight"))
    out = []
    unmatched: list[str] = []
    problems: list[str] = []
    for path in adapters:
        path = Path(path)
        ad = read_adapter(path)
        if dylora_note(ad, path.name):
            warn(dylora_note(ad, path.name))  # type: ignore[arg-type]
        if ad.format == "kohya":
            ad, _, _ = resolve_kohya_names(ad, modules)
        tmap: dict[str, str] = {}
        flipped: list[str] = []
        for m, t in ad.targets.items():
            hit = _module_name(model, m)
            if hit is None:
                if any(c + ".weight_u" in params for c in _candidates(m)):
                    raise UnsupportedError(f"adapter target {m!r} is a factorized layer; merge the adapter into the dense "
                                           "model first (lorasurgeon merge), then factorize", path)
                unmatched.append(f"{path.name}: {m}")
                continue
            shape = tuple(params[hit + ".weight"].shape)
            conv1d = type(model.get_submodule(hit)).__name__ == "Conv1D"  # GPT-2's, weight stored (in, out)
            if not t.is_conv and t.fan_in_fan_out != conv1d:  # peft sets the flag per module by its type
                t = ad.targets[m] = replace(t, fan_in_fan_out=conv1d)
                flipped.append(m)
            if tuple(t.delta_shape()) != shape:
                problems.append(f"{path.name}: {m} (adapter {list(t.delta_shape())} vs model {list(shape)})")
                continue
            if t.bias is not None and bool(t.bias.any()) and hit + ".bias" not in params:
                problems.append(f"{path.name}: {m} (LoRA bias but the model's layer has no bias)")
                continue
            tmap[m] = hit
        if flipped and ad.format == "peft":  # (the other layouts hold no flag: nothing said otherwise)
            warn(f"{path.name}: fan_in_fan_out taken from the model's layout for {len(flipped)} target(s) (e.g. "
                f"{flipped[0]}), as peft does by module type: the adapter's config says otherwise")
        out.append((path, ad, tmap))
    if problems:
        raise MatchError(f"{len(problems)} adapter target(s) do not fit the model: " + "; ".join(problems[:10]))
    if unmatched and not allow_unmatched:
        raise MatchError(f"{len(unmatched)} adapter target(s) match no module of the model: " + ", ".join(unmatched[:10])
                         + ("" if len(unmatched) <= 10 else ", ...") + " (pass --allow-unmatched to skip them)")
    if unmatched:
        warn(f"skipping {len(unmatched)} unmatched adapter target(s): " + ", ".join(unmatched[:10]))
    return out


def merge_into_model(model: nn.Module, read: Sequence[tuple[Path, Adapter, dict[str, str]]]) -> int:
    """W' = W + Σ s_i B_i A_i in place on the in-memory model (fp32 accumulate, ``lora.merge_weight``;
    DoRA, LoRA biases and modules_to_save as ``merge`` does). Returns the number of weights changed."""
    params = dict(model.named_parameters())
    state_names = set(model.state_dict())
    per_weight: dict[str, list[tuple[LoraTarget, float]]] = {}
    saved: dict[str, torch.Tensor] = {}
    for path, ad, tmap in read:
        for m, mod in tmap.items():
            per_weight.setdefault(mod, []).append((ad.targets[m], 1.0))
        for n, t in ad.modules_to_save.items():
            hit = next((c for c in [*_candidates(n), f"{getattr(model, 'base_model_prefix', '')}.{n}"] if c in state_names), None)
            if hit is None:
                raise MatchError(f"modules_to_save tensor {n!r} matches no tensor of the model", path)
            saved[hit] = t
    with torch.no_grad():
        for mod, parts in per_weight.items():
            w = params[mod + ".weight"]
            w.copy_(lora.merge_weight(w.detach(), parts))
            if any(t.bias is not None for t, _ in parts) and mod + ".bias" in params:  # (zero biases when absent)
                b = params[mod + ".bias"]
                b.copy_(lora.merge_bias(b.detach(), parts))
        if saved:
            sd = model.state_dict()
            for n, t in saved.items():
                if tuple(sd[n].shape) != tuple(t.shape):
                    raise MatchError(f"modules_to_save tensor {n!r} is {list(t.shape)}, the model's is {list(sd[n].shape)}")
                sd[n].copy_(t.to(sd[n].dtype))
    return len(per_weight) + len(saved)


class _SwitchableLinear(nn.Module):
    """base(x) + (x·A)·B with A (in×r) and B (r×out) as graph inputs that default to zeros,
    so an onnxruntime adapter (``.onnx_adapter``) can replace them at run time."""

    def __init__(self, base: nn.Linear, tag: float) -> None:
        super().__init__()
        self.base = base
        # Distinct values while tracing: the exporter merges initializers with equal contents.
        self.lora_A = nn.Parameter(torch.full((base.in_features, 1), tag))
        self.lora_B = nn.Parameter(torch.full((1, base.out_features), tag))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + torch.matmul(torch.matmul(x, self.lora_A), self.lora_B)


def _adapter_targets(read: Sequence[tuple[Path, Adapter, dict[str, str]]]) -> list[str]:
    mods: set[str] = set()
    for path, ad, tmap in read:
        if ad.modules_to_save:
            raise UnsupportedError("--separate-adapters: an adapter with modules_to_save replaces weights; merge it instead", path)
        for m, mod in tmap.items():
            t = ad.targets[m]
            has_bias = t.bias is not None and bool(t.bias.any())
            if t.is_conv or t.magnitude is not None or has_bias or t.fan_in_fan_out or t.init:
                what = ("conv" if t.is_conv else "DoRA" if t.magnitude is not None else "LoRA bias" if has_bias
                        else "fan_in_fan_out" if t.fan_in_fan_out else f"initialised with {t.init!r} (it changes the base)")
                raise UnsupportedError(f"--separate-adapters supports plain LoRA on Linear layers; {m!r} is {what}: merge it instead", path)
            mods.add(mod)
    return sorted(mods)


def _install_switchable(model: nn.Module, modules: Sequence[str]) -> None:
    for i, name in enumerate(modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise UnsupportedError(f"--separate-adapters: {name!r} is {type(base).__name__}, not a Linear layer")
        setattr(parent, child, _SwitchableLinear(base, 1.0 + i / 1000.0))


# --------------------------------------------------------------------------- ONNX steps
_EXPORT_LOCK = threading.Lock()


def _torch_export(module: nn.Module, feed: dict[str, torch.Tensor], spec: InputSpec, output: str,
                  path: Path, opset: int) -> None:
    """The TorchScript exporter: deterministic, and the graph onnxruntime's BERT fusions expect."""
    args = tuple(feed[n] for n in spec.names)
    # The exporter puts the module back in the mode it found it in: a new wrapper is in training
    # mode, which would switch dropout on in the model it wraps.
    module.eval()
    # torch's exporter keeps global state (one export at a time per process), and stdout and the
    # warning filters are process-wide too: concurrent calls take turns
    with _EXPORT_LOCK, open(os.devnull, "w") as devnull, warnings.catch_warnings(), \
            contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=list(spec.names), output_names=[output],
            dynamic_axes=spec.dynamic_axes(output), opset_version=opset, dynamo=False,
            do_constant_folding=True,
        )
    module.eval()


def _ops(model: Any) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _save(model: Any, path: Path, external: bool) -> None:
    import onnx

    if external:
        data = path.name + ".data"
        with contextlib.suppress(FileNotFoundError):
            (path.parent / data).unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _set_metadata(model: Any, meta: dict[str, Any]) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta, sort_keys=True, separators=(",", ":"))


def _finish_switchable(model: Any, modules: Sequence[str]) -> dict[str, tuple[str, str, int, int]]:
    """Rename the LoRA initializers to ``<module>.lora_A`` / ``.lora_B``, zero them (rank 1: the
    base model's function when no adapter is active) and declare them as overridable inputs.
    A module the output does not use (a BERT pooler under mean pooling) is not in the graph:
    it is left out."""
    from onnx import TensorProto, helper, numpy_helper

    names: dict[str, tuple[str, str, int, int]] = {}
    inits = {i.name: i for i in model.graph.initializer}
    rename: dict[str, str] = {}
    for mod in modules:
        pair: list[str] = []
        dims_io: list[int] = []
        for part in ("lora_A", "lora_B"):
            old = f"model.{mod}.{part}"
            if old not in inits:
                break
            new = f"{mod}.{part}"
            rename[old] = new
            arr = numpy_helper.to_array(inits[old])
            init = numpy_helper.from_array(np.zeros_like(arr), new)
            inits[old].CopyFrom(init)
            dims: list[Any] = [arr.shape[0], f"rank_{mod}"] if part == "lora_A" else [f"rank_{mod}", arr.shape[1]]
            model.graph.input.append(helper.make_tensor_value_info(new, TensorProto.FLOAT, dims))
            pair.append(new)
            dims_io.append(int(arr.shape[0] if part == "lora_A" else arr.shape[1]))
        if len(pair) == 2:
            names[mod] = (pair[0], pair[1], dims_io[0], dims_io[1])
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
    return names


def _write_adapter(path: Path, ad: Adapter, tmap: dict[str, str], names: dict[str, tuple[str, str, int, int]]) -> None:
    """One onnxruntime adapter: A as (in×r), s·B as (r×out); modules it does not touch get zeros."""
    import onnxruntime as ort

    params: dict[str, Any] = {}
    by_module = {mod: ad.targets[m] for m, mod in tmap.items()}
    for mod, (a_name, b_name, n_in, n_out) in names.items():
        t = by_module.get(mod)
        if t is None:
            a, b = np.zeros((n_in, 1), np.float32), np.zeros((1, n_out), np.float32)
        else:
            a = t.A.float().T.contiguous().numpy()
            b = (t.B.float() * t.scale).T.contiguous().numpy()
        params[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
        params[b_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))


def _optimize(path: Path, out: Path, lm: LoadedModel, threads: int) -> tuple[str, dict[str, int]]:
    """onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu...) for BERT-like
    encoders; otherwise onnxruntime's extended graph optimizations, saved into the file."""
    import onnxruntime as ort

    mt = BERT_LIKE.get(str((lm.config or {}).get("model_type", ""))) if lm.kind == "hf" else None
    if mt is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = lm.model.config
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            opt = optimize_model(str(path), model_type=mt, num_heads=int(cfg.num_attention_heads),
                                 hidden_size=int(cfg.hidden_size), opt_level=0, use_gpu=False)
        fused = {k: int(v) for k, v in sorted(opt.get_fused_operator_statistics().items()) if v}
        opt.save_model_to_file(str(out))
        return f"onnxruntime.transformers ({mt})", fused
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    before, after = _ops(_load(path)), _ops(_load(out))
    fused = {k: int(after[k]) for k in sorted(after) if after[k] > before.get(k, 0)}
    return "onnxruntime (extended)", fused


def _to_fp16(path: Path, out: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = convert_float_to_float16(_load(path), keep_io_types=True)
    _save(m, out, False)


def _quantize(path: Path, out: Path, external: bool) -> None:
    """Dynamic int8: weights per output channel (per-tensor scales cost MiniLM 0.957 mean cosine,
    per-channel 0.9915, measured here); activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logging(), contextlib.redirect_stdout(open(os.devnull, "w")), warnings.catch_warnings():  # noqa: SIM115
        warnings.simplefilter("ignore")
        # DefaultTensorType: fused com.microsoft ops (after --optimize) have no inferred types.
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=external,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """onnxruntime's Python tools warn through the root logger; our log lines say what happens."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _step(what: str, source: str) -> Iterator[None]:
    """An onnxruntime tool that fails on this graph: one clear line, not an internal error."""
    try:
        yield
    except LorasurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - the tools raise many types
        raise UnsupportedError(f"{what} failed on this graph: {' '.join(str(e).split())[:250]}", source) from None


# --------------------------------------------------------------------------- onnxruntime
def providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


def session(path: Path, threads: int, cpu_only: bool = False, spinning: bool = True) -> Any:
    """An onnxruntime session with ``threads`` intra-op threads, all graph optimizations.
    ``spinning=False`` for interleaved timing: idle onnxruntime threads busy-wait for a while
    after each run and would steal the CPU from whatever runs next (measured here: PyTorch
    1.4x slower right after an onnxruntime run with spinning on, on 2 cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"] if cpu_only else providers())
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime cannot load the exported graph: {' '.join(str(e).split())[:300]}", path) from None


def run_session(sess: Any, feed: dict[str, torch.Tensor], run_options: Any = None) -> np.ndarray:
    out = sess.run(None, {k: v.numpy() for k, v in feed.items()}, run_options)[0]
    return np.asarray(out, dtype=np.float32)


def verify_cases(spec: InputSpec) -> list[tuple[int, int | None, tuple[int, ...] | None]]:
    """Several batch sizes and lengths (or spatial sizes) through the dynamic axes."""
    if spec.kind == "tensor":
        cases: list[tuple[int, int | None, tuple[int, ...] | None]] = [(1, None, None), (2, None, None), (5, None, None)]
        if spec.spatial:
            cases.append((2, None, spec.alternative_shape()))
        return cases
    cap = spec.max_len
    return [(b, s, None) for b, s in sorted({(1, min(7, cap)), (2, min(16, cap)), (4, min(48, cap)), (8, min(128, cap))})]


def _compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """max|got − ref|, that over max|ref|, and max|ref|."""
    if got.shape != ref.shape:
        raise VerificationError(f"onnxruntime output is {list(got.shape)}, PyTorch's {list(ref.shape)}")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if not np.all(np.isfinite(got)):
        return float("inf"), float("inf"), scale
    d = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if got.size else 0.0
    return d, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")), scale


def verify(sess: Any, lm: LoadedModel, spec: InputSpec, atol: float, reference: str = "pytorch",
           run_options: Any = None, rtol: float = 0.0) -> Verification:
    """onnxruntime against the PyTorch model on ``verify_cases``: each batch passes when
    max|Δ| ≤ atol + rtol · max|reference|."""
    cases = []
    for i, (b, s, shape) in enumerate(verify_cases(spec)):
        feed = spec.make(b, s, seed=1000 + i, shape=shape)
        a, r, scale = _compare(run_session(sess, feed, run_options), _reference(lm, feed))
        cases.append(VerifyCase(b, s if spec.kind == "text" else None, list(feed[spec.names[0]].shape), a, r, scale))
    worst_a = max(c.max_abs_error for c in cases)
    worst_r = max(c.max_rel_error for c in cases)
    passed = all(c.max_abs_error <= c.tolerance(atol, rtol) for c in cases)
    return Verification(sess.get_providers()[0], reference, atol, worst_a, worst_r, passed, cases, rtol)


def agreement(sess: Any, lm: LoadedModel, spec: InputSpec, out_name: str, minimum: float,
              samples: int = 64, batch: int = 16) -> Agreement:
    """Task agreement of a quantized graph with the PyTorch model: mean cosine of embeddings,
    or the share of samples whose top-1 class is unchanged."""
    got_all, ref_all = [], []
    for i in range(0, samples, batch):
        feed = spec.make(batch, min(64, spec.max_len), seed=5000 + i)
        got_all.append(run_session(sess, feed))
        ref_all.append(_reference(lm, feed))
    got, ref = np.concatenate(got_all), np.concatenate(ref_all)
    d = float(np.max(np.abs(got - ref)))
    if out_name == "embeddings":
        g, r = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
        cos = (g * r).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
        value, metric = float(cos.mean()), "mean_cosine"
    else:
        value = float((got.reshape(len(got), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)).mean())
        metric = "top1_agreement"
    return Agreement(metric, value, minimum, len(got), value >= minimum, d)


def _timing(ts: list[float]) -> Timing:
    ms = sorted(t * 1000 for t in ts)
    p90 = ms[min(len(ms) - 1, int(np.ceil(0.9 * len(ms))) - 1)]
    return Timing(round(statistics.median(ms), 3), round(p90, 3), len(ms))


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, runs: int) -> dict[str, Timing]:
    """Time each function ``runs`` times after ``warmup`` calls, one call of each in turn, so a
    change of machine load affects every contestant alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: _timing(v) for k, v in times.items()}


# --------------------------------------------------------------------------- pipeline
@dataclass
class _Built:
    lm: LoadedModel
    spec: InputSpec
    out_name: str
    path: Path  # the staged .onnx
    external: bool
    matmul_nodes: int
    nodes: int
    optimizer: str | None
    fused: dict[str, int]
    verification: Verification
    agreement: Agreement | None
    quantized: str | None
    adapter_files: list[Path]
    adapter_checks: list[Verification]
    adapter_names: list[str] = field(default_factory=list)  # final file names of adapter_files, in order
    outside_graph: list[str] = field(default_factory=list)  # separate adapters' targets the graph does not use


def _graph_io(value: Any) -> dict[str, Any]:
    """An ONNX graph input/output as the report states it: name, shape (a named dynamic axis as
    its name, a fixed one as its size) and element type."""
    import onnx

    t = value.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
    return {"name": value.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _build(
    lm: LoadedModel, stage: Path, name: str, *, input_shape: Sequence[int] | None, opset: int, dtype: str,
    atol: float, optimize: bool, quantize: str | None, min_agreement: float | None, threads: int,
    meta: dict[str, Any], external_threshold: int, log: LogFn, rtol: float = 0.0,
    separate: Sequence[tuple[Path, Adapter, dict[str, str]]] = (), final_name: str | None = None,
) -> _Built:
    spec = input_spec(lm, input_shape)
    out_name = output_name(lm)
    path = stage / name
    raw = stage / f"{name}.export"
    raw.mkdir()
    weight_bytes = sum(t.numel() * t.element_size() for t in lm.model.state_dict().values())
    if dtype == "fp16":
        weight_bytes //= 2
    external = weight_bytes >= external_threshold
    modules = _adapter_targets(separate) if separate else []
    export_lm = lm
    if modules:
        import copy

        model_copy = copy.deepcopy(lm.model)
        _install_switchable(model_copy, modules)
        export_lm = LoadedModel(model_copy, lm.kind, lm.source, lm.tokenizer, lm.config, lm.factorized, lm.arch)
    feed = spec.make(2, min(16, spec.max_len), seed=0)
    log(f"exporting ({spec.kind} inputs: {', '.join(spec.names)}; output: {out_name}; opset {opset})")
    try:
        _torch_export(_Exported(export_lm, spec.names), feed, spec, out_name, raw / "model.onnx", opset)
    except LorasurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter's errors name the unsupported op
        raise UnsupportedError(f"torch.onnx.export failed: {' '.join(str(e).split())[:300]}", lm.source) from None
    model = _load(raw / "model.onnx")  # external data, if the exporter wrote any, is read back in
    ops = _ops(model)
    matmuls, nodes = ops.get("MatMul", 0) + ops.get("Gemm", 0), sum(ops.values())
    names: dict[str, tuple[str, str, int, int]] = {}
    if modules:
        names = _finish_switchable(model, modules)
        if not names:
            raise UnsupportedError("--separate-adapters: no adapter target is in the exported graph")
    _set_metadata(model, meta)
    _save(model, path, external)
    del model
    shutil.rmtree(raw, ignore_errors=True)
    optimizer, fused = None, {}
    if optimize:
        log("optimizing the graph")
        tmp = stage / f"{name}.opt"
        with _step("--optimize", lm.source), _quiet_logging():
            optimizer, fused = _optimize(path, tmp, lm, threads)
        m = _load(tmp)
        _set_metadata(m, meta)
        _save(m, path, external)
        tmp.unlink()
    if dtype == "fp16":
        log("converting to fp16")
        tmp = stage / f"{name}.fp16"
        with _step("--dtype fp16", lm.source), _quiet_logging():
            _to_fp16(path, tmp)
        m = _load(tmp)
        _set_metadata(m, meta)
        _save(m, path, external)
        tmp.unlink()
    log(f"verifying against PyTorch on {len(verify_cases(spec))} input batches")
    sess = session(path, threads)
    ver = verify(sess, lm, spec, atol, reference="pytorch (fp32)" if dtype == "fp16" else "pytorch", rtol=rtol)
    if not ver.passed:
        raise VerificationError(f"onnxruntime differs from PyTorch: {ver.failure()}; nothing written", lm.source)
    adapter_files: list[Path] = []
    adapter_names: list[str] = []
    checks: list[Verification] = []
    if modules:
        import onnxruntime as ort

        stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
        fname = final_name or name
        final_stem = fname[: -len(".onnx")] if fname.endswith(".onnx") else fname
        used: set[str] = set()
        for j, (apath, ad, tmap) in enumerate(separate):
            aname = apath.name.split(".")[0] or "adapter"
            while aname in used:
                aname += "_"
            used.add(aname)
            # staged under an ASCII name (onnxruntime's C++ loader takes UTF-8 paths only), renamed at commit
            afile = stage / f"{stem}.{aname if is_utf8(aname) else f'adapter{j}'}.onnx_adapter"
            adapter_names.append(f"{final_stem}.{aname}.onnx_adapter")
            _write_adapter(afile, ad, tmap, names)
            adapter_files.append(afile)
            merged = _merged_copy(lm, [(apath, ad, tmap)])
            ro = ort.RunOptions()
            la = ort.LoraAdapter()
            la.Load(str(afile))
            ro.add_active_adapter(la)
            check = verify(sess, merged, spec, atol, reference=f"pytorch with {apath.name} merged", run_options=ro, rtol=rtol)
            checks.append(check)
            if not check.passed:
                raise VerificationError(f"with adapter {apath.name} active, onnxruntime differs from the merged PyTorch model: "
                                        f"{check.failure()}; nothing written", apath)
    agree = None
    if quantize:
        ver.reference = "pytorch (the fp32 graph, before int8 quantization; see agreement)"
        log("quantizing (int8, dynamic)")
        tmp = stage / f"{name}.int8"
        with _step("--quantize int8", lm.source):
            _quantize(path, tmp, external)
        m = _load(tmp)
        _set_metadata(m, meta)
        _save(m, path, external)
        tmp.unlink()
        with contextlib.suppress(FileNotFoundError):
            (stage / f"{name}.int8.data").unlink()
        minimum = DEFAULT_AGREEMENT[out_name] if min_agreement is None else min_agreement
        agree = agreement(session(path, threads), lm, spec, out_name, minimum)
        if not agree.passed:
            raise VerificationError(f"int8 model agrees with PyTorch below the gate: {agree.metric} {agree.value:.10g} < "
                                    f"{minimum:.10g} (--min-agreement); nothing written", lm.source)
    return _Built(lm, spec, out_name, path, external, matmuls, nodes, optimizer, fused, ver, agree,
                  quantize, adapter_files, checks, adapter_names, [m for m in modules if m not in names])


def _merged_copy(lm: LoadedModel, read: Sequence[tuple[Path, Adapter, dict[str, str]]]) -> LoadedModel:
    import copy

    m = copy.deepcopy(lm.model)
    merge_into_model(m, read)
    return LoadedModel(m, lm.kind, lm.source, lm.tokenizer, lm.config, lm.factorized, lm.arch)


def _files(b: _Built) -> list[Path]:
    data = b.path.parent / (b.path.name + ".data")
    return [data, b.path] if b.external and data.exists() else [b.path]


def export_model(
    model: str | Path | None,
    out: str | Path,
    *,
    arch: str | None = None,
    adapters: Sequence[str | Path] = (),
    allow_unmatched: bool = False,
    separate_adapters: bool = False,
    input_shape: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    atol: float | None = None,
    rtol: float | None = None,
    optimize: bool = False,
    quantize: str | None = None,
    min_agreement: float | None = None,
    benchmark: bool = False,
    baseline: str | Path | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    threads: int = 2,
    warmup: int = 5,
    runs: int = 20,
    force: bool = False,
    log: LogFn | None = None,
    external_data_threshold: int = EXTERNAL_DATA_BYTES,
) -> ExportResult:
    """Export a model to ONNX, verify it against PyTorch, optionally benchmark it.

    Args:
        model: Hugging Face folder (dense or factorized), or the weights for ``arch``.
        out: the ``.onnx`` file (with ``OUT.data`` beside it when the weights pass 2 GB).
        arch: ``module:factory`` building the model for a checkpoint.
        adapters: LoRA adapters (PEFT, kohya, diffusers) merged into the weights before export.
        separate_adapters: instead, write one onnxruntime ``.onnx_adapter`` per adapter beside
            the output and make the graph's LoRA weights switchable at run time.
        input_shape: one sample's shape (no batch axis) for tensor inputs.
        opset: ONNX opset (13-20).
        dtype: "fp32" or "fp16" (weights and compute in fp16; inputs and outputs fp32).
        atol, rtol: each verification batch passes when max |ONNX − PyTorch| ≤ atol + rtol ·
            max |PyTorch output| (defaults: atol 1e-4, rtol 0 for fp32; atol 1e-2, rtol 5e-3 for fp16).
        optimize: save onnxruntime's graph optimizations into the file.
        quantize: "int8" for onnxruntime dynamic quantization, gated by task agreement.
        min_agreement: the gate (mean cosine for embeddings, top-1 agreement for logits).
        benchmark: time PyTorch eager and onnxruntime at ``batch_size`` × ``seq_len``.
        baseline: a (dense) model exported and timed in the same run (implies ``benchmark``).
        threads: intra-op threads for onnxruntime and PyTorch.
        external_data_threshold: weight bytes from which weights go to ``OUT.data``.

    Returns:
        ExportResult (schema ``lorasurgeon.export/1``).

    Raises:
        InputNotFoundError, FormatError, InvalidOptionError, MatchError, UnsupportedError;
        VerificationError (exit 3) when onnxruntime and PyTorch disagree, nothing written.
    """
    adapters = one_or_many(adapters) or []
    log = log or (lambda m: None)
    said: list[str] = []

    def warn(message: str) -> None:  # logged, and kept for the result
        said.append(message)
        log(f"warning: {message}")

    given, out = out, Path(out)
    if dtype not in DEFAULT_ATOL:
        raise InvalidOptionError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise InvalidOptionError(f"--opset must be between {OPSET_RANGE[0]} and {OPSET_RANGE[1]} (the TorchScript exporter's range), got {opset}")
    if quantize not in (None, "int8"):
        raise InvalidOptionError(f"--quantize supports int8 only, got {quantize!r}")
    if quantize and dtype == "fp16":
        raise InvalidOptionError("--quantize int8 starts from fp32 weights; drop --dtype fp16")
    if min_agreement is not None and not 0.0 < min_agreement <= 1.0:
        raise InvalidOptionError(f"--min-agreement must be in (0, 1], got {min_agreement}")
    if separate_adapters:
        if not adapters:
            raise InvalidOptionError("--separate-adapters needs at least one --adapter")
        if quantize or dtype == "fp16" or optimize:
            raise UnsupportedError("--separate-adapters works with plain fp32 graphs only; drop --quantize, --dtype fp16 and --optimize")
    for name, v in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--threads", threads), ("--runs", runs)):
        if v < 1:
            raise InvalidOptionError(f"{name} must be at least 1, got {v}")
    if warmup < 0:
        raise InvalidOptionError(f"--warmup must be at least 0, got {warmup}")
    atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    rtol = DEFAULT_RTOL[dtype] if rtol is None else float(rtol)
    for name, tol in (("--atol", atol), ("--rtol", rtol)):
        if not 0 <= tol < float("inf"):
            raise InvalidOptionError(f"{name} must be a number >= 0, got {tol:g}")
    if Path(out).suffix.lower() != ".onnx":
        raise InvalidOptionError(f"name the ONNX output .onnx, got {Path(out).name!r} (a later step would read another "
                                 "extension as something else)", out)
    check_output(given, force, [model, *adapters, baseline], directory=False)
    benchmark = benchmark or baseline is not None

    log("loading the model")
    lm = resolve(model, arch, None if separate_adapters else _adapter_head(adapters))
    if (lm.config or {}).get("is_encoder_decoder") and not type(lm.model).__name__.endswith("EncoderModel"):
        raise UnsupportedError(f"{type(lm.model).__name__} is an encoder-decoder model; export takes encoders (and "
                               "classifiers): save its encoder alone (e.g. T5EncoderModel) and export that", model)
    dropped = next((a for a in ((lm.config or {}).get("architectures") or []) if isinstance(a, str) and a.endswith(
        ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration", "ForPreTraining"))), None)
    if dropped and not lm.has_head:
        warn(f"the folder holds a {dropped}; its language-model head is not exported: the graph outputs the "
            "mean-pooled last hidden states (sentence embeddings)")
    read = _read_adapters(lm.model, adapters, allow_unmatched, warn) if adapters else []
    if read and not separate_adapters:
        n = merge_into_model(lm.model, read)
        log(f"merged {len(read)} adapter(s) into {n} weight(s)")
    opts = {"arch": arch, "opset": opset, "dtype": dtype, "optimize": optimize, "quantize": quantize,
            "separate_adapters": separate_adapters, "input_shape": list(input_shape) if input_shape else None,
            "allow_unmatched": allow_unmatched, "exporter": "torchscript", "torch": torch.__version__}
    inputs = ([model] if model is not None else []) + list(adapters)
    meta = provenance("export", opts, inputs, extra={"format": "onnx"})

    term = contextlib.ExitStack()  # SIGTERM runs the finally below (then the default comes back)
    term.enter_context(writer.sigterm_exits())
    # Staged under ASCII names: torch.onnx's and onnxruntime's C++ bindings take UTF-8 paths
    # only, and a POSIX file name need not be UTF-8. Each file gets its real name at commit.
    staged = out.name if is_utf8(out.name) else "model.onnx"
    stage_dir = Path(tempfile.mkdtemp(prefix=".lorasurgeon-export-stage-", dir=out.parent))
    stage, alias_dir = stage_dir, None
    if not is_utf8(str(stage_dir)):  # a folder on the way is not UTF-8: work through a UTF-8 symlink to the stage
        alias_dir = Path(tempfile.mkdtemp(prefix="lorasurgeon-export-"))
        stage = alias_dir / "stage"
        os.symlink(stage_dir, stage)
    try:
        with torch_threads(threads):
            built = _build(lm, stage, staged, input_shape=input_shape, opset=opset, dtype=dtype, atol=atol, rtol=rtol,
                           optimize=optimize, quantize=quantize, min_agreement=min_agreement, threads=threads,
                           meta=meta, external_threshold=external_data_threshold, log=log,
                           separate=read if separate_adapters else (), final_name=out.name)
            if built.outside_graph:
                warn(f"adapter targets outside the exported graph (the output does not use them): "
                     f"{', '.join(built.outside_graph)}")
            if built.external:
                if staged != out.name:
                    raise UnsupportedError(
                        "the weights pass 2 GB, so they go to an external data file that the .onnx names, and ONNX "
                        "stores that name as UTF-8: choose an output name that is valid UTF-8", out)
                log(f"the weights pass 2 GB: they go to {out.name}.data beside {out.name} (ONNX external data); keep the two files together")
            bench = None
            if benchmark:
                bench = _benchmark(built, baseline, arch, stage, input_shape=input_shape, opset=opset, dtype=dtype,
                                   atol=atol, rtol=rtol, optimize=optimize, quantize=quantize, min_agreement=min_agreement,
                                   batch_size=batch_size, seq_len=seq_len, threads=threads, warmup=warmup,
                                   runs=runs, external_threshold=external_data_threshold, log=log)
        main_files = [(f, out.name + f.name[len(staged):]) for f in _files(built)]
        files = [*zip(built.adapter_files, built.adapter_names), *main_files]
        for _, final in files:
            check_output(out.parent / final, force)
        size = sum(f.stat().st_size for f in _files(built))
        digest = _sha256(_files(built))
        final = _load(built.path)
        final_ops = _ops(final)
        outputs = [_graph_io(o) for o in final.graph.output]
        del final
        # data first, the .onnx last: when OUT appears, everything it needs is there
        commit_files([(f, out.parent / final) for f, final in files])
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
        if alias_dir is not None:
            shutil.rmtree(alias_dir, ignore_errors=True)
        term.close()
    ver = built.verification
    return ExportResult(
        schema=SCHEMA, model=None if model is None else str(model), arch=arch, kind=built.spec.kind, output=str(out),
        external_data=str(out.parent / (out.name + ".data")) if built.external else None, bytes=size, sha256=digest,
        opset=opset, dtype=dtype, exporter="torch.onnx.export (TorchScript, dynamo=False)",
        inputs=built.spec.describe(), outputs=outputs,
        factorized_layers=len(lm.factorized), matmul_nodes=built.matmul_nodes, nodes=sum(final_ops.values()),
        adapters=[str(a) for a in adapters], adapter_mode=("separate" if separate_adapters else "merged") if adapters else None,
        adapter_files=[str(out.parent / n) for n in built.adapter_names], optimized=built.optimizer,
        fused_ops=built.fused, quantized=built.quantized, verification=ver, agreement=built.agreement,
        benchmark=bench, adapter_verification=built.adapter_checks, warnings=said,
    )


def _benchmark(built: _Built, baseline: str | Path | None, arch: str | None, stage: Path, *, input_shape: Sequence[int] | None,
               opset: int, dtype: str, atol: float, optimize: bool, quantize: str | None, min_agreement: float | None,
               batch_size: int, seq_len: int, threads: int, warmup: int, runs: int, external_threshold: int,
               log: LogFn, rtol: float = 0.0) -> Benchmark:
    spec = built.spec
    seq = min(seq_len, spec.max_len) if spec.kind == "text" else None
    feed = spec.make(batch_size, seq, seed=7, full=True)
    base: _Built | None = None
    if baseline is not None:
        log(f"exporting the baseline {baseline}")
        blm = resolve(baseline, arch)
        base_stage = stage / "baseline"
        base_stage.mkdir()
        base = _build(blm, base_stage, "baseline.onnx", input_shape=input_shape, opset=opset, dtype=dtype, atol=atol,
                      rtol=rtol, optimize=optimize, quantize=quantize, min_agreement=min_agreement, threads=threads, meta={},
                      external_threshold=external_threshold, log=log)
        if base.spec.names != spec.names or base.spec.sample_shape != spec.sample_shape:
            raise InvalidOptionError("the baseline takes different inputs than the model; compare like with like", baseline)
    sess = session(built.path, threads, cpu_only=True, spinning=False)
    np_feed = {k: v.numpy() for k, v in feed.items()}
    fns: dict[str, Callable[[], Any]] = {}

    def torch_fn(lm: LoadedModel) -> Callable[[], Any]:
        def f() -> Any:
            with torch.inference_mode():
                return model_outputs(lm, feed)
        return f

    fns["pytorch"] = torch_fn(built.lm)
    fns["onnxruntime"] = lambda: sess.run(None, np_feed)
    if base is not None:
        bsess = session(base.path, threads, cpu_only=True, spinning=False)
        fns["baseline_pytorch"] = torch_fn(base.lm)
        fns["baseline_onnxruntime"] = lambda: bsess.run(None, np_feed)
    shape = f"{batch_size}x{seq}" if seq else f"{batch_size}x{'x'.join(map(str, spec.sample_shape))}"
    log(f"benchmarking at {shape} on {threads} thread(s): {warmup} warm-up + {runs} timed runs each, interleaved")
    load_before = os.getloadavg()[0]
    t = time_interleaved(fns, warmup, runs)
    load_after = os.getloadavg()[0]
    res = Benchmark(batch_size, seq, threads, warmup, runs, "CPUExecutionProvider", t["pytorch"], t["onnxruntime"],
                    round(t["pytorch"].median_ms / t["onnxruntime"].median_ms, 3),
                    [round(load_before, 2), round(load_after, 2)])
    if base is not None:
        res.baseline = BaselineResult(str(baseline), sum(f.stat().st_size for f in _files(base)), base.verification,
                                      t["baseline_pytorch"], t["baseline_onnxruntime"])
        res.speedup_vs_baseline = round(t["baseline_onnxruntime"].median_ms / t["onnxruntime"].median_ms, 3)
        res.pytorch_speedup_vs_baseline = round(t["baseline_pytorch"].median_ms / t["pytorch"].median_ms, 3)
    return res
