"""Low-rank layers whose state-dict keys are exactly the factorized format (GUIDE §3).

``LowRankLinear``: ``weight_u`` (out×k), ``weight_v`` (k×in), ``bias`` — y = (x Vᵀ) Uᵀ + b,
two thin MatMuls in an ONNX graph. ``LowRankConv2d``: ``weight_v`` (k×in×kh×kw, the k×k conv to
k channels with the original stride/padding/dilation) then ``weight_u`` (out×k×1×1) with the bias.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorasurgeon.errors import FormatError


class FactorizedWeight:
    """``.weight`` of a factorized layer: the dense weight's dtype, device and shape, for model code
    that reads them (transformers' T5 feed-forward casts its input to ``wo.weight.dtype`` when
    ``wo.weight`` is a tensor). It is deliberately not a tensor: code that would compute with the
    dense weight fails loudly instead of getting a wrong matrix; ``dense_weight()`` forms it."""

    def __init__(self, factor: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.dtype, self.device, self.shape = factor.dtype, factor.device, torch.Size(shape)
        self.ndim = len(shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Declared so that torch sees an object it must not compute with: fused fast paths
        that take layers' weights directly (``nn.TransformerEncoderLayer`` in inference) check
        for it and take their plain path, which calls the layers; a function that would compute
        with it fails with this message, not a wrong matrix."""
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"{name}() was given a factorized layer's .weight, which is two factors, not a tensor: "
                        "this model code reads the weight directly; keep that layer dense (factorize -x), or "
                        "densify the model (factorize --densify)")


class LowRankLinear(nn.Module):
    """A Linear layer stored as two factors: W ≈ weight_u @ weight_v."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.weight_v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight_u, a=5**0.5)
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> LowRankLinear:
        """An uninitialised LowRankLinear of ``layer``'s shape, dtype and device (the factors are
        random: load factors into it, e.g. ``load_factorized``; ``factorize.factorize_weight``
        computes them from a weight)."""
        return cls(layer.in_features, layer.out_features, rank, layer.bias is not None,
                   device=layer.weight.device, dtype=layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return (self.weight_u.float() @ self.weight_v.float()).to(self.weight_u.dtype)

    @property
    def weight(self) -> FactorizedWeight:
        """What model code that reads ``layer.weight`` gets (see ``FactorizedWeight``)."""
        return FactorizedWeight(self.weight_u, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowRankConv2d(nn.Module):
    """A groups=1 Conv2d stored as a k-channel k×k conv followed by a 1×1 conv."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise FormatError(f"cannot factorize a grouped conv (groups={conv.groups})")
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.padding_mode = conv.padding_mode
        self._reversed_padding = getattr(conv, "_reversed_padding_repeated_twice", None)
        self.weight_v = nn.Parameter(torch.empty(rank, conv.in_channels, *conv.kernel_size, **kw))
        self.weight_u = nn.Parameter(torch.empty(conv.out_channels, rank, 1, 1, **kw))
        self.bias = nn.Parameter(torch.zeros(conv.out_channels, **kw)) if conv.bias is not None else None
        nn.init.kaiming_uniform_(self.weight_u, a=5**0.5)
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            h = F.conv2d(x, self.weight_v, None, self.stride, 0, self.dilation)
        else:
            h = F.conv2d(x, self.weight_v, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.weight_u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        u = self.weight_u.float().reshape(self.out_channels, self.rank)
        v = self.weight_v.float().reshape(self.rank, -1)
        return (u @ v).reshape(self.out_channels, self.in_channels, *self.kernel_size).to(self.weight_u.dtype)

    @property
    def weight(self) -> FactorizedWeight:
        """What model code that reads ``layer.weight`` gets (see ``FactorizedWeight``)."""
        return FactorizedWeight(self.weight_u, (self.out_channels, self.in_channels, *self.kernel_size))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, stride={self.stride}"


def factorized_layers(metadata: Mapping[str, str], path: Any = None) -> dict[str, dict[str, Any]]:
    """The ``layers`` table of a factorized checkpoint's ``lorasurgeon`` metadata ({} if none).

    Raises:
        FormatError: the metadata is not a JSON object, or a layer lacks a known kind, a positive
            integer rank or a shape of the right length (``path`` names the file in the message).
    """
    raw = metadata.get("lorasurgeon")
    if not raw:
        return {}
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError("lorasurgeon metadata is not valid JSON", path) from None
    if not isinstance(rec, dict):
        raise FormatError("lorasurgeon metadata is not a JSON object", path)
    if rec.get("format") != "factorized":
        return {}
    layers = rec.get("layers", {})
    if not isinstance(layers, dict):
        raise FormatError("lorasurgeon metadata: 'layers' is not an object", path)
    for name, spec in layers.items():
        kind = spec.get("kind", "linear") if isinstance(spec, dict) else None
        rank = spec.get("rank") if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (
            kind in ("linear", "conv2d")
            and isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
            and isinstance(shape, list) and len(shape) == (2 if kind == "linear" else 4)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        ):
            raise FormatError(
                f"lorasurgeon metadata: factorized layer {name!r:.80} needs kind linear|conv2d, a positive integer "
                f"rank and its shape; got {json.dumps(spec)[:80]}", path,
            )
    return dict(layers)


def apply_factorization(model: nn.Module, layers: Mapping[str, Mapping[str, Any]], copy_model: bool = True,
                        path: Any = None) -> nn.Module:
    """Replace each named Linear/Conv2d by its low-rank twin (parameters uninitialised until a
    state dict is loaded). Returns a copy unless ``copy_model`` is False. ``path`` (the
    checkpoint) is named in the FormatError raised when a layer does not fit the model."""
    if copy_model:
        model = copy.deepcopy(model)
    for name, spec in sorted(layers.items()):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, child, None)
        rank = int(spec["rank"])
        if isinstance(old, (nn.Linear, nn.Conv2d)) and "shape" in spec and list(old.weight.shape) != list(spec["shape"]):
            raise FormatError(f"factorized layer {name!r} has shape {list(spec['shape'])} in the metadata but "
                              f"{list(old.weight.shape)} in the model", path)
        if isinstance(old, nn.Linear) and spec.get("kind", "linear") == "linear":
            new: nn.Module = LowRankLinear.from_linear(old, rank)
        elif isinstance(old, nn.Conv2d) and spec.get("kind") == "conv2d":
            if old.groups != 1:  # its weight is out×(in/groups)×kh×kw: not the dense map the factors stand for
                raise FormatError(f"factorized layer {name!r} is a grouped conv (groups={old.groups}) in the model; "
                                  "a grouped conv cannot be factorized (factorize with --arch to skip it)", path)
            new = LowRankConv2d(old, rank)
        else:
            raise FormatError(
                f"factorized layer {name!r} ({spec.get('kind')}) does not match the model's module "
                f"({type(old).__name__ if old is not None else 'missing'})", path
            )
        setattr(parent, child, new)
    return model


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, the other names of the same tensor (tied weights: T5's and BART's
    ``embed_tokens`` are their ``shared`` table), so one stored copy fills them all."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return {n: [o for o in g if o != n] for g in groups.values() if len(g) > 1 for n in g}


def load_factorized(model: nn.Module, checkpoint: Any) -> nn.Module:
    """Turn ``model`` plus a factorized checkpoint (path or ``Checkpoint``) into the runnable
    factorized model: layers swapped, every tensor loaded strictly. ``model`` is not modified."""
    from lorasurgeon.io.checkpoint import Checkpoint

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    layers = factorized_layers(ck.metadata, ck.path)
    if not layers:
        raise FormatError("not a lorasurgeon factorized checkpoint (no layers in its metadata)", ck.path)
    out = apply_factorization(model, layers, path=ck.path)
    state = {n: ck.get(n) for n in ck.names()}
    missing, unexpected = out.load_state_dict(state, strict=False)
    # Buffers a checkpoint may legitimately omit (e.g. position_ids) are tolerated; weights are not.
    tied = tied_names(out)
    missing = [m for m in missing if not m.endswith(("position_ids", "num_batches_tracked"))
               and not any(o in state for o in tied.get(m, ()))]
    unexpected = [u for u in unexpected if not u.endswith(("position_ids", "num_batches_tracked"))]
    if missing or unexpected:
        raise FormatError(
            f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}", ck.path
        )
    return out


# --------------------------------------------------------------------------- LoRA wrappers
class LoRALinear(nn.Module):
    """y = base(x) + s · B(A(dropout(x))), the base layer frozen and kept as ``base_layer``
    (PEFT's layout: ``lora_A`` in→r, ``lora_B`` r→out, B initialised to zero)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (rank**0.5) if rslora else alpha / rank
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class LoRAConv1D(LoRALinear):
    """LoRA on a GPT-2 style ``Conv1D`` (y = x @ W + b, W stored in×out): the same factors as
    LoRALinear (``lora_A`` in→r, ``lora_B`` r→out); PEFT saves them with ``fan_in_fan_out``."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (rank**0.5) if rslora else alpha / rank
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Linear(int(w.shape[0]), rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, int(w.shape[1]), bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.ndim == 2


class LoRAConv2d(nn.Module):
    """Conv2d + s · (1×1 conv B)∘(k×k conv A), A with the base's stride/padding/dilation."""

    def __init__(self, base_layer: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        if base_layer.groups != 1:
            raise FormatError(f"LoRA on a grouped conv (groups={base_layer.groups}) is not supported")
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (rank**0.5) if rslora else alpha / rank
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size, base_layer.stride,
                                base_layer.padding, base_layer.dilation, bias=False, **kw)
        self.lora_B = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
