"""``attach`` (train LoRA adapters on a dataset) and ``distill`` (train a factorized student to
match its teacher)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorasurgeon._finite import json_safe
from lorasurgeon.data import Dataset, load_dataset, split
from lorasurgeon.errors import FormatError, InvalidOptionError, MatchError
from lorasurgeon.io.adapters import Adapter, LoraTarget, write_adapter
from lorasurgeon.io.checkpoint import ST_DTYPES, Checkpoint
from lorasurgeon.io.writer import (
    METADATA_KEY,
    TensorSpec,
    check_output,
    provenance,
    write_like_input,
    write_safetensors,
)
from lorasurgeon.nn.layers import LoRAConv1D, LoRAConv2d, LoRALinear, LowRankConv2d, LowRankLinear, is_conv1d
from lorasurgeon.nn.models import (
    LoadedModel,
    classifier_head_size,
    head_label_names,
    load_model,
    model_outputs,
    prepare_inputs,
)
from lorasurgeon.train import (
    FitResult,
    TrainOptions,
    accuracy,
    agreement,
    fit,
    is_main_process,
    kd_loss,
    keeps_caller_rng,
    mean_cosine,
    predict,
    resolve_device,
)

ProgressFn = Callable[[int, int, str], None]


def _in_label_order(ds: Dataset, names: list[str], data: str | Path) -> Dataset:
    """Relabel ``ds`` so that class ids are the positions of its class names in ``names`` (a model's
    own head: output i is ``names[i]``), instead of the names' sorted order."""
    if ds.labels is None or ds.classes is None:
        return ds
    unknown = [c for c in ds.classes if c not in names]
    if unknown:
        raise FormatError(f"the data's labels {unknown[:5]} are not classes of the model's head ({', '.join(names)}: "
                          "config.json id2label); train from a model folder without a head to get a new one", data)
    order = torch.tensor([names.index(c) for c in ds.classes], dtype=torch.int64)
    return Dataset(ds.kind, ds.inputs, order[ds.labels], list(names), ds.name, ds.extra)


def _prepare_data(lm: LoadedModel, data: str | Path, opts: TrainOptions, *, text_column: str, label_column: str | None,
                  image_size: int | None, limit: int | None, need_labels: bool,
                  loaded: Dataset | None = None) -> tuple[Dataset, Dataset, Dataset | None, Dataset]:
    """``loaded``: the dataset, when the caller has read it already (attach looks at its classes first)."""
    ds = loaded if loaded is not None else load_dataset(data, text_column=text_column, label_column=label_column, image_size=image_size, limit=limit)
    ds = prepare_inputs(lm, ds, data, opts.max_length)
    if need_labels and ds.labels is None:
        where = "no 'y' array" if ds.kind != "text" else f"no column {label_column!r}; use --label-column"
        raise InvalidOptionError(f"dataset {ds.name!r} has no labels ({where}); attach trains a classifier and needs them",
                                 data if Path(str(data)).exists() else None)
    train, val, test = split(ds, opts.val_split, opts.seed, opts.test_split)
    return train, val, test, ds


# --------------------------------------------------------------------------- attach
@dataclass
class AttachResult:
    schema: str
    output: str
    mode: str  # "lora" | "full"
    targets: list[str]
    heads: list[str]
    trainable_params: int
    total_params: int
    rank: int | None
    alpha: float | None
    classes: list[str] | None
    fit: dict[str, Any]
    val_accuracy_before: float
    val_accuracy: float
    test_accuracy: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def inject_lora(model: nn.Module, patterns: Sequence[str], skip: Sequence[str], rank: int, alpha: float,
                dropout: float, rslora: bool, allow_unmatched: bool = False,
                unmatched: list[str] | None = None) -> list[str]:
    """Wrap every Linear / groups-1 Conv2d whose name matches a pattern (and is not in ``skip``)
    with a LoRA layer, in place. Returns the wrapped module names; with ``allow_unmatched``, the
    patterns that matched nothing are appended to ``unmatched``.

    Raises:
        MatchError: a pattern matches no adaptable module (unless allow_unmatched), or none at all.
    """
    adaptable = {n: m for n, m in model.named_modules()
                 if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1) or is_conv1d(m))
                 and not any(n == s or n.startswith(s + ".") for s in skip)}
    chosen: list[str] = []
    for p in patterns:
        hit = [n for n in adaptable if fnmatchcase(n, p)]
        if not hit and unmatched is not None:
            unmatched.append(p)
        if not hit and not allow_unmatched:
            raise MatchError(f"--target {p!r} matches no Linear, Conv2d or Conv1D module; " + (
                f"modules look like: {', '.join(list(adaptable)[:5])}" if adaptable else "the model has none"))
        chosen += [n for n in hit if n not in chosen]
    if not chosen:
        raise MatchError("no module to adapt")
    conv1d = sorted(n for n in chosen if is_conv1d(adaptable[n]))
    if conv1d and len(conv1d) != len(chosen):  # PEFT's fan_in_fan_out is one flag for the whole adapter
        other = sorted(set(chosen) - set(conv1d))
        raise MatchError(f"the targets mix GPT-2 style Conv1D layers ({conv1d[0]!r}) with Linear/Conv2d ones ({other[0]!r}); "
                         "a PEFT adapter holds one kind (fan_in_fan_out is one flag): choose one with --target")
    for n in sorted(chosen):
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        cls = LoRAConv1D if is_conv1d(base) else LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        setattr(parent, child, cls(base, rank, alpha, dropout, rslora))
    return sorted(chosen)


def _ident(p: str | Path | None) -> str | None:
    """A path as an absolute path (a named set as its name): how a --resume recognises its inputs."""
    return None if p is None else str(Path(p).resolve()) if Path(str(p)).exists() else str(p)


def _default_heads(lm: LoadedModel) -> list[str]:
    """A Hugging Face classifier's head: every child module with parameters but the base model
    (``classifier``; DistilBERT's ``pre_classifier`` and ``classifier``; BART's
    ``classification_head``; Llama's ``score``)."""
    if lm.kind != "hf" or not type(lm.model).__name__.endswith("ForSequenceClassification"):
        return []
    prefix = getattr(lm.model, "base_model_prefix", "")
    return [n for n, m in lm.model.named_children() if n != prefix and any(True for _ in m.parameters())]


@keeps_caller_rng
def attach_lora(
    model_path: str | Path | None,
    data: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    targets: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    rslora: bool = False,
    heads: Sequence[str] | None = None,
    full: bool = False,
    opts: TrainOptions | None = None,
    text_column: str = "text",
    label_column: str | None = "label",
    image_size: int | None = None,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
    allow_unmatched: bool = False,
    progress: ProgressFn | None = None,
) -> AttachResult:
    """Fine-tune LoRA adapters (or, with ``full``, every weight) on a labelled dataset.

    Writes a PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads (new heads saved as
    modules_to_save) plus ``metrics.json``; with ``full`` a model folder (HF) or a safetensors file.
    The best epoch by validation accuracy is kept; a ``test_split`` is scored once at the end.

    Raises:
        InvalidOptionError, MatchError, FormatError, OutputExistsError.
    """
    opts = replace(opts) if opts is not None else TrainOptions()  # a copy: the caller's options stay as given
    opts.validate()
    opts.device = resolve_device(opts.device)
    if rank < 1:
        raise InvalidOptionError(f"--rank must be a positive integer, got {rank}")
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise InvalidOptionError(f"--alpha must be a positive number, got {alpha:g}")
    if not (0 <= dropout < 1):
        raise InvalidOptionError(f"--dropout must be in [0, 1), got {dropout:g}")
    given, out = out, Path(out)
    resume_file = out.parent / f".{out.name}.train-state.pt"
    if not resume:
        check_output(given, force, [model_path], data=data, directory=not full or (model_path is not None and Path(model_path).is_dir()))
    alpha = float(alpha if alpha is not None else rank)
    torch.manual_seed(opts.seed)  # LoRA and new-head initialisation depend on the seed only
    probe = load_dataset(data, text_column=text_column, label_column=label_column, image_size=image_size, limit=limit)
    num_labels = probe.num_classes
    if num_labels is not None and num_labels < 2:
        one = f" ({probe.classes[0]!r})" if probe.classes else ""
        raise FormatError(f"the data has one class{one}: a classifier needs at least two", data)
    own_head = classifier_head_size(model_path) if arch is None else None
    label_names = head_label_names(model_path) if arch is None else None
    if label_names is not None and probe.classes is not None:
        probe = _in_label_order(probe, label_names, data)  # the head's classes, by name (others refused)
        num_labels = len(label_names)
    if own_head is not None and num_labels is not None and own_head != num_labels:
        raise FormatError(f"the data has {num_labels} classes but the model's classification head has {own_head} outputs "
                          "(train from a model folder without a head to get a new one)", data)
    if model_path is None and not full:
        raise InvalidOptionError("LoRA adapts a trained model: give its weights (attach WEIGHTS --arch ...); without "
                                 "weights only --full makes sense (training the model from its initialisation)")
    if arch is None and heads is not None and not heads and own_head is None and not full:
        raise InvalidOptionError("--no-head: the model folder has no classification head of its own; attach adds a new "
                                 "one, which must be trained and saved (drop --no-head)", model_path)
    lm = load_model(model_path, arch=arch, num_labels=num_labels if arch is None else None, device=opts.device)
    train, val, test, ds = _prepare_data(lm, data, opts, text_column=text_column, label_column=label_column,
                                         image_size=image_size, limit=limit, need_labels=True, loaded=probe)
    model = lm.model
    with torch.no_grad():
        n_out = int(model_outputs(lm, {k: v[:1].to(opts.device) for k, v in ds.inputs.items()}).shape[-1])
    if len(ds) and int(ds.labels.max()) >= n_out:
        named = f" ({len(ds.classes)} classes)" if ds.classes else ""
        raise FormatError(f"labels run up to {int(ds.labels.max())}{named} but the model's head has {n_out} outputs "
                          f"(classes 0 to {n_out - 1})", data)
    head_names = list(heads) if heads is not None else _default_heads(lm)
    for h in head_names:
        try:
            model.get_submodule(h)
        except AttributeError:
            raise MatchError(f"--head {h!r} is not a module of the model") from None
    for p in model.parameters():
        p.requires_grad_(False)
    matched: list[str] = []
    if full:
        params = [(n, p) for n, p in model.named_parameters()]
    else:
        # the default targets never include the model's own head, trained whole or (--no-head) kept as is
        skip = head_names or ([] if targets else _default_heads(lm))
        unmatched: list[str] = []
        matched = inject_lora(model, targets or ["*"], skip, rank, alpha, dropout, rslora, allow_unmatched, unmatched)
        params = [(n, p) for n, p in model.named_parameters()
                  if ".lora_A." in n or ".lora_B." in n or any(n.startswith(h + ".") for h in head_names)]
    for _, p in params:
        p.requires_grad_(True)

    def logits(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_outputs(lm, inputs)

    def loss_fn(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits(inputs), labels)

    def evaluate(d: Dataset) -> float:
        return accuracy(predict(logits, d, opts.batch_size * 2, opts.device), d.labels)

    options = {"rank": rank, "alpha": alpha, "dropout": dropout, "rslora": rslora, "targets": list(targets or []),
               "heads": head_names, "full": full, "train": {k: v for k, v in asdict(opts).items() if k != "device"},
               "text_column": text_column, "label_column": label_column, "image_size": image_size, "limit": limit}
    run_id = {**options, "model": _ident(model_path), "arch": arch, "data": _ident(data)}  # what --resume must match
    fr: FitResult = fit(model, params, train, val, loss_fn, evaluate, opts, progress=progress,
                        resume_file=resume_file, resume=resume, fingerprint=run_id)
    before = fr.initial_metric  # fit scores the starting parameters (epoch 0): not evaluated twice
    val_acc = evaluate(val)
    test_acc = evaluate(test) if test is not None else None
    result = AttachResult(
        "lorasurgeon.attach/1", str(out), "full" if full else "lora", matched, head_names,
        sum(p.numel() for _, p in params), sum(p.numel() for p in model.parameters()),
        None if full else rank, None if full else alpha, ds.classes, fr.to_json(), round(before, 6),
        round(val_acc, 6), None if test_acc is None else round(test_acc, 6),
    )
    full_rank = {n: min(m.weight.shape[0], m.weight[0].numel()) for n, m in model.named_modules()
                 if isinstance(m, (LoRALinear, LoRAConv2d)) for m in [m.base_layer]}
    over = sorted(n for n, r in full_rank.items() if rank >= r)
    if not full and unmatched:
        result.extra.setdefault("warnings", []).extend(
            f"--target {p!r} matches no Linear, Conv2d or Conv1D module: skipped (--allow-unmatched)" for p in unmatched)
    if over and not full:
        result.extra.setdefault("warnings", []).extend([
            f"--rank {rank} is at least the full rank of {len(over)} adapted module(s) (e.g. {over[0]}: rank at most "
            f"{full_rank[over[0]]}): LoRA there is no low-rank update and trains more parameters than a full one"])
    if not is_main_process():
        return result
    inputs = [p for p in (model_path,) if p is not None] + ([data] if Path(str(data)).exists() else [])
    prov = provenance("attach", options, inputs, extra={"dataset": str(data) if not Path(str(data)).exists() else Path(str(data)).name})
    metrics = {k: v for k, v in result.to_json().items() if k not in ("output",)}
    for h in metrics["fit"]["history"]:
        h.pop("samples_per_s", None)  # timings vary run to run; the files must not
    metrics["fit"].pop("resumed_from", None)  # a resumed run's files equal an uninterrupted run's (--json keeps it)
    files = {"metrics.json": json.dumps(json_safe(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"}
    if full:
        _save_full(lm, model, out, prov, force or resume, files, [str(c) for c in ds.classes or []])
    else:
        targets_out: dict[str, LoraTarget] = {}
        for n in matched:
            layer = model.get_submodule(n)
            targets_out[n] = LoraTarget(n, layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone(),
                                        alpha, layer.scaling, fan_in_fan_out=isinstance(layer, LoRAConv1D))
        saved = {f"{h}.{k}": v.detach().clone() for h in head_names for k, v in model.get_submodule(h).state_dict().items()}
        cfg = {"task_type": "SEQ_CLS" if lm.kind == "hf" and head_names else None, "lora_dropout": dropout,
               "modules_to_save": head_names or None}
        ad = Adapter("peft", targets_out, saved, {}, cfg, rslora, None)
        write_adapter(ad, out, "peft", provenance_meta=prov, force=force or resume, extra_files=files)
    resume_file.unlink(missing_ok=True)
    return result


def _save_full(lm: LoadedModel, model: nn.Module, out: Path, prov: dict[str, Any], force: bool, files: dict[str, str],
               classes: list[str]) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    meta = {METADATA_KEY: prov}
    if lm.kind == "hf":
        import transformers

        from lorasurgeon.io.writer import atomic_path

        # the config of the model trained (a head class, e.g. BertForSequenceClassification, not
        # the base's BertModel), with the classes it was trained on as its labels
        config = copy.deepcopy(model.config)
        if getattr(transformers, type(model).__name__, None) is type(model):
            config.architectures = [type(model).__name__]
        if len(classes) == getattr(config, "num_labels", None):
            config.id2label = dict(enumerate(classes))
            config.label2id = {c: i for i, c in enumerate(classes)}
        with atomic_path(out, force, directory=True) as tmp:
            config.save_pretrained(tmp)
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            write_safetensors(tmp / "model.safetensors", specs, state.items(), meta)
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
    else:
        write_safetensors(out, specs, state.items(), meta, force=force)


# --------------------------------------------------------------------------- distill
@dataclass
class DistillResult:
    schema: str
    output: str
    loss: str
    temperature: float
    trainable_params: int
    before: dict[str, float]
    after: dict[str, float]
    fit: dict[str, Any]
    test: dict[str, float] | None = None  # after training, on --test-split (never used for choosing)
    test_before: dict[str, float] | None = None  # the starting student on the same test split

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _fidelity(kind: str, s_out: torch.Tensor, t_out: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    if kind == "kl":
        r = agreement(s_out, t_out)
        if labels is not None:
            r["accuracy"] = accuracy(s_out, labels)
            r["teacher_accuracy"] = accuracy(t_out, labels)
        return {k: round(v, 6) for k, v in r.items()}
    return {"mean_cosine": round(mean_cosine(s_out, t_out), 6)}


@keeps_caller_rng
def distill_student(
    teacher: str | Path,
    student: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    loss: str = "auto",
    temperature: float = 2.0,
    train_bias_norm: bool = False,
    feature_loss: float = 0.0,
    opts: TrainOptions | None = None,
    text_column: str = "text",
    label_column: str | None = "label",
    image_size: int | None = None,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> DistillResult:
    """Train a factorized student's low-rank factors to match the teacher's outputs.

    Loss: KL(softmax(t/T) ‖ softmax(s/T))·T² on logits, or 1 − cosine / MSE on embeddings of
    encoders without a head (``auto`` picks by the model). The data may be unlabelled. Writes a
    factorized checkpoint of the student's layout (file or folder, same metadata).

    ``feature_loss`` = λ > 0 adds λ times the mean over factorized layers of the relative squared
    error of each layer's output against the teacher's same-named layer, ‖y_s − y_t‖² / ‖y_t‖²
    (padding positions excluded for text): a dense signal at every layer instead of one at the
    output (intermediate-layer distillation, as in TinyBERT).

    Raises:
        FormatError: the student is not a factorized checkpoint.
    """
    opts = replace(opts) if opts is not None else TrainOptions()  # a copy: the caller's options stay as given
    opts.validate()
    opts.device = resolve_device(opts.device)
    given, out = out, Path(out)
    resume_file = out.parent / f".{out.name}.train-state.pt"
    if not resume:
        check_output(given, force, [teacher, student], data=data, directory=Path(student).is_dir())
    if temperature <= 0:
        raise InvalidOptionError(f"--temperature must be positive, got {temperature:g}")
    if not feature_loss >= 0:
        raise InvalidOptionError(f"--feature-loss must be >= 0, got {feature_loss:g}")
    lt = load_model(teacher, arch=arch, device=opts.device)
    ls = load_model(student, arch=arch, device=opts.device)
    if not ls.factorized:
        raise FormatError("the student is not a lorasurgeon factorized checkpoint (run factorize first)", student)
    kind = loss if loss != "auto" else ("kl" if lt.has_head else "cosine")
    if kind not in ("kl", "mse", "cosine"):
        raise InvalidOptionError(f"--loss must be auto, kl, mse or cosine, got {loss!r}")
    if kind == "kl" and not lt.has_head:
        raise InvalidOptionError("--loss kl compares class probabilities, and this model outputs embeddings (no "
                                 "classification head): use --loss cosine (the default here) or mse", teacher)
    _check_student_of(lt, ls, student)
    train, val, test, _ds = _prepare_data(lt, data, opts, text_column=text_column, label_column=label_column,
                                           image_size=image_size, limit=limit, need_labels=False)
    model = ls.model
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[tuple[str, nn.Parameter]] = []
    for mn, m in model.named_modules():
        if isinstance(m, (LowRankLinear, LowRankConv2d)):
            params += [(f"{mn}.weight_u", m.weight_u), (f"{mn}.weight_v", m.weight_v)]
        if train_bias_norm and isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            params += [(f"{mn}.{k}", p) for k, p in m.named_parameters(recurse=False)]
        elif train_bias_norm and isinstance(getattr(m, "bias", None), nn.Parameter):  # every layer's bias, dense or not
            params.append((f"{mn}.bias", m.bias))
    for _, p in params:
        p.requires_grad_(True)

    features = _FeatureTaps(lt.model, model) if feature_loss > 0 else None

    def t_out(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model_outputs(lt, inputs)

    def s_out(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_outputs(ls, inputs)

    def loss_fn(inputs: dict[str, torch.Tensor], _labels: torch.Tensor | None) -> torch.Tensor:
        if features is not None:
            features.on = True
        try:
            s, t = s_out(inputs), t_out(inputs)
        finally:
            if features is not None:
                features.on = False
        if kind == "kl":
            out = kd_loss(s, t, temperature)
        elif kind == "mse":
            out = F.mse_loss(s, t)
        else:
            out = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        if features is not None:
            out = out + feature_loss * features.loss(inputs.get("attention_mask"))
        return out

    t_val = predict(t_out, val, opts.batch_size * 2, opts.device)

    def evaluate(d: Dataset) -> float:
        s = predict(s_out, d, opts.batch_size * 2, opts.device)
        if kind == "kl":
            # agreement, with KL only breaking ties: 1e-9 keeps the reported figure (6 decimals) the agreement
            a = agreement(s, t_val)
            return a["top1_agreement"] - 1e-9 * a["kl"]
        return mean_cosine(s, t_val)

    before = _fidelity(kind, predict(s_out, val, opts.batch_size * 2, opts.device), t_val, val.labels)
    t_test = predict(t_out, test, opts.batch_size * 2, opts.device) if test is not None else None
    test_before = (_fidelity(kind, predict(s_out, test, opts.batch_size * 2, opts.device), t_test, test.labels)
                   if test is not None else None)
    options = {"loss": kind, "temperature": temperature, "train_bias_norm": train_bias_norm, "feature_loss": feature_loss,
               "train": {k: v for k, v in asdict(opts).items() if k != "device"}, "limit": limit,
               "text_column": text_column, "label_column": label_column, "image_size": image_size,
               "dataset": str(data) if not Path(str(data)).exists() else Path(str(data)).name}
    run_id = {**options, "teacher": _ident(teacher), "student": _ident(student), "arch": arch, "data": _ident(data),
              "text_column": text_column, "label_column": label_column, "image_size": image_size}
    fr = fit(model, params, train, val, loss_fn, evaluate, opts, metric_name="agreement" if kind == "kl" else "mean_cosine",
             progress=progress, resume_file=resume_file, resume=resume, fingerprint=run_id)
    after = _fidelity(kind, predict(s_out, val, opts.batch_size * 2, opts.device), t_val, val.labels)
    result = DistillResult("lorasurgeon.distill/1", str(out), kind, temperature, sum(p.numel() for _, p in params),
                           before, after, fr.to_json())
    if test is not None:  # never used for choosing: scored at the end, teacher against student
        result.test = _fidelity(kind, predict(s_out, test, opts.batch_size * 2, opts.device), t_test, test.labels)
        result.test_before = test_before
    if is_main_process():  # (the state is rank 0's to keep, until its output is written)
        _write_student(ls, Path(student), out, teacher, data, result, force or resume, options)
        resume_file.unlink(missing_ok=True)
    if features is not None:
        features.remove()
    return result


def _check_student_of(lt: LoadedModel, ls: LoadedModel, student: str | Path) -> None:
    """The student must be a factorization of the teacher: every dense tensor of the student the
    teacher has by name and shape, and each factorized layer's U·V the shape of the teacher's weight.

    Raises:
        FormatError: the first few tensors that do not fit.
    """
    t = {n: tuple(p.shape) for n, p in lt.model.state_dict().items()}
    s = ls.model.state_dict()
    bad: list[str] = []
    for n, p in s.items():
        if n.endswith(".weight_u"):
            layer = n[: -len(".weight_u")]
            v = s.get(f"{layer}.weight_v")
            want = (int(p.shape[0]), *(int(d) for d in v.shape[1:])) if v is not None else None
            if t.get(f"{layer}.weight") != want:
                bad.append(f"{layer} ({list(want or [])} vs the teacher's {list(t.get(layer + '.weight') or ['none'])})")
        elif not n.endswith(".weight_v") and n in t and t[n] != tuple(p.shape):
            bad.append(f"{n} ({list(p.shape)} vs {list(t[n])})")
        elif not n.endswith((".weight_v", "position_ids", "num_batches_tracked")) and n not in t:
            bad.append(f"{n} (the teacher has none)")
    if bad:
        raise FormatError(f"the student is not a factorization of this teacher: {len(bad)} tensor(s) do not fit, e.g. "
                          + "; ".join(bad[:3]), student)


class _FeatureTaps:
    """Forward hooks that keep each factorized student layer's output and its teacher twin's.

    Student and teacher are the same architecture (the student was factorized from the teacher),
    so a layer is paired by module name. Outputs are kept only while ``on`` (training steps).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        t_mods = dict(teacher.named_modules())
        self.on = False
        self.t: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in student.named_modules():
            if isinstance(m, (LowRankLinear, LowRankConv2d)) and name in t_mods:
                self.handles.append(m.register_forward_hook(self._keep(self.s, name)))
                self.handles.append(t_mods[name].register_forward_hook(self._keep(self.t, name)))
        if not self.handles:
            raise InvalidOptionError("--feature-loss: no factorized student layer has a same-named teacher layer")

    def _keep(self, store: dict[str, torch.Tensor], name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            if self.on:
                store[name] = out
        return hook

    def loss(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over paired layers of ‖y_s − y_t‖² / ‖y_t‖², over unmasked positions."""
        terms = []
        for name, ys in self.s.items():
            yt = self.t[name].detach()
            diff = (ys - yt).float().pow(2)
            ref = yt.float().pow(2)
            if mask is not None and ys.ndim == 3 and tuple(mask.shape) == tuple(ys.shape[:2]):
                w = mask.to(diff.dtype).unsqueeze(-1)
                diff, ref = diff * w, ref * w
            terms.append(diff.sum() / ref.sum().clamp_min(1e-12))
        self.s.clear()
        self.t.clear()
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _write_student(ls: LoadedModel, student: Path, out: Path, teacher: str | Path, data: str | Path,
                   result: DistillResult, force: bool, options: dict[str, Any]) -> None:
    """Write the trained student with exactly the tensor names and metadata of its input file."""
    state = ls.model.state_dict()
    with Checkpoint.open(student) as ck:
        names = ck.names()
        prefix = getattr(ls.model, "base_model_prefix", "")

        def trained(n: str) -> torch.Tensor | None:
            """The model's tensor for the file's name ``n``: the same name; the bare file name in a
            model with a head; or the file's headed name (model.x) in the bare model (x)."""
            for k in (n, f"{prefix}.{n}", n.removeprefix(f"{prefix}.")) if prefix else (n,):
                if k in state:
                    return state[k]
            return None

        def lookup(n: str) -> torch.Tensor:
            t = trained(n)
            # not part of the module (a non-persistent buffer, the head of a model loaded bare): copied through
            return ck.get(n) if t is None else t

        def spec(n: str) -> TensorSpec:
            t = trained(n)
            if t is None:
                i = ck.info(n)
                return TensorSpec(n, ST_DTYPES[i.dtype], i.shape)
            return TensorSpec(n, t.dtype, tuple(t.shape))

        specs = [spec(n) for n in names]
        meta: dict[str, Any] = {k: v for k, v in ck.metadata.items() if k != METADATA_KEY}
        layers = json.loads(ck.metadata[METADATA_KEY])["layers"]
        inputs = [teacher, student] + ([data] if Path(str(data)).exists() else [])
        meta[METADATA_KEY] = provenance("distill", options, inputs, extra={"format": "factorized", "layers": layers})
        write_like_input(ck, student, out, specs, ((n, lookup(n).detach().contiguous()) for n in names), meta, force)
