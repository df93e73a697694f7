"""Resolve a runnable model: a Hugging Face folder, ``--arch module:factory`` plus weights, or a
factorized checkpoint or folder (rebuilt from its metadata, no flags)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorasurgeon._finite import all_finite
from lorasurgeon.errors import (
    FormatError,
    InputNotFoundError,
    InvalidOptionError,
    LorasurgeonError,
    UnsupportedError,
)
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.nn.layers import apply_factorization, factorized_layers, tied_names
from lorasurgeon.train import resolve_device

if TYPE_CHECKING:
    from lorasurgeon.data import Dataset

# Buffers that checkpoints may hold or omit depending on the library version that saved them.
IGNORABLE = ("position_ids", "num_batches_tracked")


@dataclass
class LoadedModel:
    """A model ready to run, with what is needed to feed it."""

    model: nn.Module
    kind: str  # "hf" (transformers) | "module" (--arch)
    source: str
    tokenizer: Any = None
    config: dict[str, Any] | None = None
    factorized: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None

    @property
    def has_head(self) -> bool:
        """True when the model outputs class logits (a classifier) rather than embeddings."""
        if self.kind == "module":
            return True
        return hasattr(self.model, "classifier") or hasattr(self.model, "score")


def import_factory(arch: str) -> Any:
    """``package.module:callable`` → the callable.

    Raises:
        InvalidOptionError: malformed, not importable, or not callable.
    """
    mod_name, sep, attr = arch.partition(":")
    if not sep or not mod_name or not attr:
        raise InvalidOptionError(f"--arch must look like 'package.module:factory', got {arch!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InvalidOptionError(f"--arch {arch!r}: cannot import {mod_name!r} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: its error, not ours
        raise InvalidOptionError(f"--arch {arch!r}: importing {mod_name!r} failed ({type(e).__name__}: {e})") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise InvalidOptionError(f"--arch {arch!r}: {attr!r} is not a callable in {mod_name!r}")
    return fn


def _call_factory(fn: Any, num_labels: int | None) -> nn.Module:
    kwargs = {}
    if num_labels is not None:
        params = inspect.signature(fn).parameters
        for name in ("num_classes", "num_labels"):
            if name in params:
                kwargs[name] = num_labels
                break
    try:
        model = fn(**kwargs)
    except LorasurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory failed: its error, not an internal one
        name = getattr(fn, "__qualname__", None) or repr(fn)
        raise InvalidOptionError(f"--arch factory {name}() failed ({type(e).__name__}: {e})") from e
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"--arch factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def head_size(config: dict[str, Any]) -> int | None:
    """The output count of a Hugging Face config's own sequence-classification head (its
    ``architectures`` name a ``*ForSequenceClassification``), else None."""
    if not any(str(a).endswith("ForSequenceClassification") for a in (config.get("architectures") or [])):
        return None
    id2label = config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else int(config.get("num_labels") or 2)


def classifier_head_size(path: str | Path | None) -> int | None:
    """``head_size`` of a model folder's config.json; None for anything else (a file, no config,
    a config that does not parse: loading the model reports that)."""
    cfg = Path(path) / "config.json" if path is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        return head_size(json.loads(cfg.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def head_label_names(path: str | Path | None) -> list[str] | None:
    """The class names of a model folder's own classification head, in output order (config.json's
    ``id2label``); None without a head, or when the names are transformers' placeholders
    (``LABEL_0``, ...), which name no class."""
    if classifier_head_size(path) is None:
        return None
    try:
        id2label = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("id2label")  # type: ignore[arg-type]
        names = [str(id2label[k]) for k in sorted(id2label, key=int)] if isinstance(id2label, dict) and id2label else None
    except (OSError, ValueError, TypeError):
        return None
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def build_arch(arch: str, num_labels: int | None = None) -> nn.Module:
    """The module ``arch`` (``module:factory``) builds, with its fresh weights."""
    return _call_factory(import_factory(arch), num_labels)


def _load_state(model: nn.Module, ck: Checkpoint, strict_head: bool = True, strip_prefix: str | None = None) -> None:
    """``strip_prefix``: load only the tensors under it, without it (a headed checkpoint into its bare model)."""
    names = ck.names() if strip_prefix is None else [n for n in ck.names() if n.startswith(strip_prefix + ".")]
    state = {n if strip_prefix is None else n[len(strip_prefix) + 1:]: ck.get(n) for n in names}
    target = model
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and not any(k.startswith(prefix + ".") for k in state):
        target = getattr(model, prefix)  # a bare encoder's weights into a model with a head
    # torch raises a multi-line RuntimeError on a shape mismatch even with strict=False: check first.
    own = target.state_dict()
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise FormatError(f"weights do not fit the model: {len(wrong)} shape mismatch(es), e.g. {wrong[0]}", ck.path)
    bad = [k for k, v in state.items() if not all_finite(v)]
    if bad:
        raise FormatError(f"tensor {bad[0]!r} holds NaN or Inf values" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                          ck.path)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(IGNORABLE)]
    unexpected = [u for u in unexpected if not u.endswith(IGNORABLE)]
    # tied parameters (BART's and T5's embed_tokens are their `shared` table): one stored copy fills all
    tied = tied_names(target)
    missing = [m for m in missing if not any(o in state for o in tied.get(m, ()))]
    if target is not model or not strict_head:
        missing = [m for m in missing if not m.startswith(("classifier", "score", "pooler", "pre_classifier"))]
        # a bare encoder's pooler, which its classifier does without (RoBERTa, DistilBERT)
        unexpected = [u for u in unexpected if not u.startswith("pooler.")]
    if missing or unexpected:
        raise FormatError(
            f"weights do not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})", ck.path)


def load_model(
    path: str | Path | None,
    *,
    arch: str | None = None,
    num_labels: int | None = None,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Build a runnable model in eval mode.

    Args:
        path: a Hugging Face model folder (dense or factorized), or the weights for ``arch``
            (a checkpoint file or folder, dense or factorized); may be None with ``arch``.
        arch: ``module:factory`` returning an nn.Module (given ``num_classes``/``num_labels``
            when it accepts them).
        num_labels: for a Hugging Face folder, add a sequence-classification head (new when the
            folder has none; then it is untrained).
        attn_implementation: transformers' attention ("eager" for ONNX export), default theirs.
        device: cpu, cuda[:N] or auto.

    Raises:
        InputNotFoundError, FormatError, InvalidOptionError (also: a device that is not there).
    """
    device = resolve_device(device)
    if arch is not None:
        model = _call_factory(import_factory(arch), num_labels)
        layers: dict[str, Any] = {}
        if path is not None:
            with Checkpoint.open(path) as ck:
                layers = factorized_layers(ck.metadata, ck.path)
                if layers:
                    model = apply_factorization(model, layers, copy_model=False, path=ck.path)
                _load_state(model, ck, strict_head=num_labels is None)
        return LoadedModel(model.eval().to(device), "module", str(path), None, None, layers, arch)
    if path is None:
        raise InvalidOptionError("give a model folder, or --arch module:factory with weights")
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such model folder", p)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        from lorasurgeon.io.adapters import peft_folder_kind

        kind = peft_folder_kind(p / "adapter_config.json")
        if kind.startswith("non-lora:"):
            raise InvalidOptionError(f"this is an adapter ({kind.removeprefix('non-lora:')}), not a model", p)
        raise InvalidOptionError("this is a LoRA adapter (peft), not a model: give the model it was trained on (export "
                                 "takes the adapter with --adapter; merge folds it into the model)", p)
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise InvalidOptionError("a checkpoint file needs --arch module:factory to build its model; a Hugging Face folder needs config.json", p)
    if importlib.util.find_spec("transformers") is None:
        raise InvalidOptionError("Hugging Face folders need transformers: pip install 'lorasurgeon[hf]'")
    with _local_quiet_transformers():
        return _load_hf(p, num_labels, attn_implementation, device)


@contextlib.contextmanager
def _local_quiet_transformers() -> Iterator[None]:
    """transformers for a local folder: offline, no progress bars (ours go to stderr; --quiet means
    quiet), errors only. The caller's environment and transformers settings are restored after."""
    from transformers.utils import logging as hf_logging

    env = os.environ.get("HF_HUB_OFFLINE")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_hf(p: Path, num_labels: int | None, attn_implementation: str | None, device: str) -> LoadedModel:
    import transformers

    try:
        config_dict = json.loads((p / "config.json").read_text(encoding="utf-8"))
        config = transformers.AutoConfig.from_pretrained(p, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:  # no or unknown model_type, unreadable JSON
        raise FormatError(f"config.json names no model transformers can build ({' '.join(str(e).split())[:200]})",
                          p / "config.json") from None
    if num_labels is not None:
        config.num_labels = num_labels
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # A folder saved from a sequence classifier keeps its head (and its module names, e.g.
    # ``bert.encoder...``): loading it as a bare encoder would drop the head and the prefix.
    # An encoder-only class the config names (T5EncoderModel): AutoModel would build the whole
    # encoder-decoder, with a decoder the folder does not hold and a forward that needs its inputs.
    encoder_only = next((getattr(transformers, a) for a in (config_dict.get("architectures") or [])
                         if isinstance(a, str) and a.endswith("EncoderModel") and hasattr(transformers, a)), None)
    auto: Any = (transformers.AutoModelForSequenceClassification if num_labels is not None or head_size(config_dict)
                 else encoder_only or transformers.AutoModel)
    archs = [a for a in (config_dict.get("architectures") or []) if isinstance(a, str)]
    other_head = next((a for a in archs if a.endswith(("ForImageClassification", "ForAudioClassification"))), None)
    if other_head and auto is not transformers.AutoModelForSequenceClassification:
        # loaded as the bare model, its classifier would be dropped without a word (export: no logits)
        raise UnsupportedError(f"the folder holds a {other_head}: only sequence-classification heads are loaded "
                               "with their model; its head would be dropped", p)
    if auto is transformers.AutoModelForSequenceClassification:
        try:
            transformers.AutoModelForSequenceClassification._model_mapping[type(config)]
        except AttributeError:  # transformers' internals moved: let from_config say it
            pass
        except KeyError:
            raise UnsupportedError(f"transformers has no sequence-classification model for "
                                   f"{config_dict.get('model_type', type(config).__name__)!r} folders; attach and "
                                   "classification take text models (or --arch module:factory)", p) from None
    with Checkpoint.open(p) as ck:
        layers = factorized_layers(ck.metadata, ck.path)
        if layers or num_labels is not None:
            # From the config, then our own strict load: works for dense and factorized folders,
            # with or without a head already in the weights.
            with torch.random.fork_rng(devices=[]):  # a new head's initialisation: seed 0, caller's RNG untouched
                torch.manual_seed(0)
                model = (auto.from_config if hasattr(auto, "from_config") else auto._from_config)(config, **attn)
            strip = None
            if layers:
                prefix = getattr(model, "base_model_prefix", "")
                keys_have_prefix = any(k.startswith(prefix + ".") for k in ck.names()) if prefix else True
                if prefix and not keys_have_prefix and hasattr(model, prefix):
                    setattr(model, prefix, apply_factorization(getattr(model, prefix), layers, copy_model=False, path=ck.path))
                elif prefix and keys_have_prefix and not hasattr(model, prefix) and auto is not transformers.AutoModelForSequenceClassification:
                    # a headed model's folder (LlamaForCausalLM: model.*, lm_head) loaded as the bare
                    # model, as from_pretrained loads it: its names lose the prefix, the head is left out
                    strip = prefix
                    layers = {n[len(prefix) + 1:]: v for n, v in layers.items() if n.startswith(prefix + ".")}
                    model = apply_factorization(model, layers, copy_model=False, path=ck.path)
                else:
                    model = apply_factorization(model, layers, copy_model=False, path=ck.path)
            _load_state(model, ck, strict_head=False, strip_prefix=strip)
        else:
            model, info = auto.from_pretrained(p, local_files_only=True, output_loading_info=True, **attn)
            # transformers fills what the folder lacks with random values and says so only in a
            # log: a wrong or partial weights file would then run (and export, and verify) as noise
            missing = [m for m in info.get("missing_keys", []) if not m.endswith(IGNORABLE) and "pooler." not in m]
            mismatched = info.get("mismatched_keys", [])
            if missing or mismatched:
                raise FormatError(
                    f"weights do not fit the model config.json describes: {len(missing)} missing (e.g. {sorted(missing)[:2]})"
                    + (f", {len(mismatched)} of another shape" if mismatched else ""), p)
    tokenizer = None
    if any((p / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    return LoadedModel(model.eval().to(device), "hf", str(p), tokenizer, config_dict, layers)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, padding excluded (sentence-transformers' pooling)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def model_outputs(lm: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for classifiers, mean-pooled embeddings for bare encoders (over tokens; over the
    spatial positions of a convolutional backbone's feature map)."""
    if lm.kind == "module":
        out = lm.model(inputs["x"])
        if not isinstance(out, torch.Tensor):
            raise UnsupportedError(f"the model's forward returns a {type(out).__name__}, not a tensor: give a "
                                   f"module:factory whose forward returns one tensor (its logits or embeddings)",
                                   lm.source)
        return out
    out = lm.model(**inputs)
    if hasattr(out, "logits"):
        return out.logits
    hidden = out.last_hidden_state
    if hidden.ndim == 4:  # a convolutional backbone's (batch, channels, h, w) map: average over space
        return hidden.mean(dim=(2, 3))
    return mean_pool(hidden, inputs.get("attention_mask"))


def prepare_inputs(lm: LoadedModel, ds: Dataset, data: str | Path, max_length: int, *, what: str = "dataset") -> Dataset:
    """Make a loaded dataset the model's input: tokenize text with the model's tokenizer, refuse a
    kind the model cannot take, then run the model once on the first examples so that inputs it
    rejects (wrong shape, channels or dtype) are reported against the data, not as a crash.

    Raises:
        InvalidOptionError: text for a model without a tokenizer, images or tensors for a text model.
        FormatError: the model fails on the data's first examples (the message names the data).
    """
    from lorasurgeon.data import tokenize

    if ds.kind == "text":
        if lm.tokenizer is None:
            raise InvalidOptionError(f"a text {what} needs a model folder with a tokenizer", lm.source)
        ds = tokenize(ds, lm.tokenizer, max_length)
    elif lm.kind == "hf":
        # Hugging Face folders are fed token ids here; vision and audio models (pixel_values,
        # input_features) take their data through --arch for now
        raise InvalidOptionError(f"{what} {ds.name!r} holds {ds.kind}s, but Hugging Face model folders are run on text "
                                 "(token ids) only; for a vision or audio model use --arch module:factory with its "
                                 "weights", lm.source)
    if len(ds):
        first = {k: v[:2].to(next(lm.model.parameters(), torch.empty(0)).device) for k, v in ds.inputs.items()}
        try:
            with torch.no_grad():
                model_outputs(lm, first)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            shapes = ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')} {list(v.shape[1:])} per example"
                               for k, v in ds.inputs.items())
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FormatError(f"the model cannot take this {what}'s inputs ({shapes}): {msg[:300]}", data) from None
    return ds


def _folder_meta_model(path: str | Path) -> nn.Module | None:
    """A Hugging Face model folder's model as its config's class builds it (the checkpoint's
    names), on the meta device (no memory, no weights). None for anything but a model folder, or
    when transformers cannot build it."""
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return None
    try:
        import transformers

        with _local_quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(p, local_files_only=True)
            archs = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
            cls = next((a for a in archs if a is not None), None)
            with torch.device("meta"):
                return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - an exotic config (or no transformers): no knowledge, as for a state dict
        return None


def folder_module_kinds(path: str | Path) -> dict[str, str] | None:
    """``module_kinds`` of a Hugging Face model folder's model, by the names its checkpoint uses.
    None for anything but a model folder, or when transformers cannot build it. A state dict
    cannot show these; the folder's config can (``_folder_meta_model``)."""
    model = _folder_meta_model(path)
    return None if model is None else module_kinds(model)


def tied_input_embedding(path: str | Path) -> str | None:
    """The weight name of a model folder's input embeddings when its output layer shares them
    (``tie_word_embeddings``: stored once, under the embeddings' name), else None; None too for
    anything transformers cannot build (``_folder_meta_model``)."""
    model = _folder_meta_model(path)
    if model is None:
        return None
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except Exception:  # noqa: BLE001 - a model class without embeddings accessors
        return None
    if inp is None or out is None or getattr(out, "weight", None) is not getattr(inp, "weight", None):
        return None
    return next((f"{n}.weight" for n, m in model.named_modules() if m is inp), None)


def conv_groups(model: nn.Module) -> dict[str, int]:
    """Each Conv2d's ``groups`` by module name (a state dict cannot show it)."""
    return {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def module_kinds(model: nn.Module) -> dict[str, str]:
    """What each module (with parameters of its own) of ``model`` is, under every name it has:
    ``linear``, ``linear-raw`` (a Linear whose parent reads its weight directly instead of calling
    it: ``nn.MultiheadAttention``'s ``out_proj``, so a low-rank twin in its place would break the
    parent), ``conv2d`` (groups 1), ``conv2d-grouped``, ``conv1d`` (GPT-2's Conv1D, weight stored
    in×out), ``embedding`` or ``other``. A Hugging Face model's names are also given without its
    ``base_model_prefix`` (checkpoints hold either)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers: no Conv1D layers either
        Conv1D = ()  # noqa: N806
    raw = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    kinds: dict[str, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, Conv1D):
            kinds[n] = "conv1d"
        elif isinstance(m, nn.Linear):
            kinds[n] = "linear-raw" if id(m) in raw else "linear"
        elif isinstance(m, nn.Conv2d):
            kinds[n] = "conv2d" if m.groups == 1 else "conv2d-grouped"
        elif isinstance(m, nn.Embedding):
            kinds[n] = "embedding"
        elif any(True for _ in m.parameters(recurse=False)):
            kinds[n] = "other"
    prefix = getattr(model, "base_model_prefix", "")
    # the checkpoint may hold the bare model's names (no "transformer." prefix) or the full ones
    if prefix:
        kinds.update({n[len(prefix) + 1:]: k for n, k in list(kinds.items()) if n.startswith(prefix + ".")})
    return kinds
