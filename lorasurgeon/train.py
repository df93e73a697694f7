"""One training loop for ``attach`` (LoRA fine-tuning) and ``distill`` (factorized student ← teacher).

Deterministic for a seed on one machine: the shuffle order comes from a seeded generator, the
global RNG (dropout, new heads) is seeded, and ``--resume`` restores both from the last epoch.
Multi-process: under ``torchrun`` (WORLD_SIZE > 1) gradients are averaged across processes with
``torch.distributed`` all-reduce (gloo on CPU, nccl on CUDA), as DistributedDataParallel does;
``--batch-size`` is per process, process r takes batches r, r+W, ... of the shared seeded order, so
a run on W processes equals a one-process run with W times the batch size. Rank 0 alone writes.
BatchNorm: frozen layers keep their statistics (eval mode); trained ones use per-process batch
statistics (no SyncBatchNorm).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lorasurgeon._distributed import world_size
from lorasurgeon._finite import json_safe
from lorasurgeon.data import Dataset
from lorasurgeon.errors import InvalidOptionError, WriteError
from lorasurgeon.io.writer import atomic_path

P = ParamSpec("P")
R = TypeVar("R")

ProgressFn = Callable[[int, int, str], None]


@dataclass
class TrainOptions:
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    val_split: float = 0.1
    test_split: float = 0.0
    max_length: int = 128
    device: str = "cpu"
    schedule: str = "constant"  # learning-rate schedule after warm-up: constant | linear | cosine (to 0)
    warmup: float = 0.0  # fraction of all optimizer steps spent warming up linearly (step k of w: (k+1)/w)

    def validate(self) -> None:
        for name, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                        ("--seed", self.seed), ("--max-length", self.max_length)):
            if isinstance(v, bool) or not isinstance(v, int):  # the library's callers: the CLI parses these
                raise InvalidOptionError(f"{name} must be a whole number, got {v!r}")
        for name, x in (("--lr", self.lr), ("--weight-decay", self.weight_decay), ("--val-split", self.val_split),
                        ("--test-split", self.test_split), ("--warmup", self.warmup)):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise InvalidOptionError(f"{name} must be a number, got {x!r}")
        if not isinstance(self.device, str) or not isinstance(self.schedule, str):
            raise InvalidOptionError(f"--device and --schedule are names, got {self.device!r} and {self.schedule!r}")
        for name, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum)):
            if v < 1:
                raise InvalidOptionError(f"{name} must be at least 1, got {v}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidOptionError(f"--lr must be a positive number, got {self.lr:g}")
        if self.schedule not in SCHEDULES:
            raise InvalidOptionError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.warmup < 1:
            raise InvalidOptionError(f"--warmup must be in [0, 1), got {self.warmup:g}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise InvalidOptionError(f"--weight-decay must be a number >= 0, got {self.weight_decay:g}")
        if self.max_length < 2:  # room for the tokenizer's own [CLS] and [SEP]
            raise InvalidOptionError(f"--max-length must be at least 2, got {self.max_length}")


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up over the first ``round(warmup * total)`` steps (from 1/w up to 1), then
    constant, linear decay to 0, or half a cosine to 0 over the remaining steps.
    """
    w = round(warmup * total)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - w) / max(1, total - w))
    return 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_metric: float
    samples_per_s: float


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_metric: float
    metric_name: str
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    initial_metric: float | None = None  # the starting parameters' validation metric (epoch 0)

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def keeps_caller_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` on a fork of torch's random state: it may seed and draw (its results depend on
    its own seed only), and the caller's generators (CPU and CUDA) are as they were after it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda: no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InvalidOptionError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun."""
    world = world_size()
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # Waiting here for the other workers blocks in C++, where Python's SIGTERM handler cannot
        # run: when another worker fails first, torchrun's SIGTERM would wait 30 s for its SIGKILL.
        # Nothing is written yet, so the default action (end now) is the right one meanwhile.
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, signal.SIG_DFL) if main else None
        try:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        finally:
            if main and previous is not None:  # (None: a handler installed from C, which stays replaced)
                signal.signal(signal.SIGTERM, previous)
    return dist.get_rank(), world


def is_main_process() -> bool:
    return _dist()[0] == 0


def _to(inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def fit(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    train: Dataset,
    val: Dataset,
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor],
    evaluate: Callable[[Dataset], float],
    opts: TrainOptions,
    *,
    metric_name: str = "accuracy",
    progress: ProgressFn | None = None,
    resume_file: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> FitResult:
    """AdamW over ``params`` with gradient accumulation; validation after each epoch; the best
    epoch's parameters (by ``evaluate``, higher is better; epoch 0 = the starting parameters) are
    loaded back at the end.

    Args:
        params: (name, parameter) pairs to train; everything else stays frozen.
        loss_fn: loss of one batch (inputs on the device, labels or None).
        resume_file: where the training state is saved after every epoch (atomically); with
            ``resume`` an existing one is loaded and training continues after its epoch.
        fingerprint: the options that define the run (JSON-able); saved with the state, and a
            ``resume`` with different ones is refused (it would continue another run).
    """
    opts.validate()
    rank, world = _dist()
    if fingerprint is not None and world > 1:  # --batch-size is per process: the world size is part of the run
        fingerprint = {**fingerprint, "world_size": world}
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    trainable = [p for _, p in params]
    opt = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)
    n_batches = math.ceil(len(train) / opts.batch_size)
    total_steps = n_batches * opts.epochs
    per_rank_batches = n_batches // world if world > 1 else n_batches
    if per_rank_batches < 1:
        raise InvalidOptionError(f"the training split has {len(train)} example(s): {n_batches} batch(es) of "
                                 f"--batch-size {opts.batch_size} for {world} processes; each process needs at least one")
    opt_steps = math.ceil(per_rank_batches / opts.grad_accum) * opts.epochs

    def share(b: int) -> float:
        """This process's batch ``b`` in its step's global batch (batches ``j·world .. j·world +
        world − 1``): its size × world / the global batch's size. Gradients are averaged over the
        processes, so each example counts as in one process's batch of the global size, also
        when the last batch is short. 1.0 (exactly) for full batches and in one process."""
        if world == 1:
            return 1.0
        first = b - b % world
        sizes = [min(opts.batch_size, len(train) - i * opts.batch_size) for i in range(first, first + world)]
        return sizes[b % world] * world / sum(sizes)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, opt_steps, opts.schedule, opts.warmup))
    history: list[EpochRecord] = []
    # Epoch 0 is the starting point: training never returns parameters that validate worse.
    model.eval()
    initial = evaluate(val)
    best = (initial, 0, {n: p.detach().clone() for n, p in params})
    start_epoch = 0
    if resume and resume_file is not None and resume_file.is_file():
        st = torch.load(resume_file, map_location="cpu", weights_only=True)
        saved = json.loads(st["options"]) if "options" in st else None
        if fingerprint is not None and saved != json.loads(json.dumps(fingerprint)):
            diff = sorted(k for k in {*(saved or {}), *fingerprint} if (saved or {}).get(k) != json.loads(json.dumps(fingerprint)).get(k))
            if "train" in diff:
                tr_s, tr_n = (saved or {}).get("train") or {}, fingerprint["train"]
                diff = [d for d in diff if d != "train"] + sorted(f"train.{k}" for k in {*tr_s, *tr_n} if tr_s.get(k) != tr_n.get(k))
            raise InvalidOptionError(f"--resume: the saved training state was made with other options (differing: "
                                     f"{', '.join(diff)}); rerun with the original options, or without --resume", resume_file)
        by_name = dict(params)
        for n, v in st["params"].items():
            by_name[n].data.copy_(v)
        opt.load_state_dict(st["optimizer"])
        if "scheduler" in st:
            sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        gen.set_state(st["gen"])
        history = [EpochRecord(**h) for h in st["history"]]
        best = (st["best_metric"], st["best_epoch"], st["best_params"])
        start_epoch = st["epoch"]
    elif resume:
        raise InvalidOptionError("--resume: no saved training state for this output", resume_file)
    trainable_ids = {id(p) for p in trainable}
    frozen_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and not any(id(p) in trainable_ids for p in m.parameters(recurse=False))]
    for epoch in range(start_epoch, opts.epochs):
        model.train()
        for m in frozen_norms:  # frozen BatchNorm keeps its running statistics (what the saved model uses)
            m.eval()
        t0 = time.perf_counter()
        seen, loss_sum, loss_n = 0, 0.0, 0
        opt.zero_grad(set_to_none=True)
        per_rank = n_batches // world if world > 1 else n_batches  # equal step counts on every rank
        j = -1
        for b, (inputs, labels) in enumerate(train.batches(opts.batch_size, shuffle=True, generator=gen)):
            if b % world != rank or b // world >= per_rank:
                continue
            j += 1
            inputs = _to(inputs, opts.device)
            labels = None if labels is None else labels.to(opts.device)
            loss = loss_fn(inputs, labels)
            (loss * share(b) / opts.grad_accum).backward()  # (× 1.0 is exact: full batches are as before)
            if (j + 1) % opts.grad_accum == 0 or j == per_rank - 1:
                if world > 1:
                    import torch.distributed as dist

                    for p in trainable:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= world
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            seen += next(iter(inputs.values())).shape[0]
            loss_sum += float(loss.detach()) * next(iter(inputs.values())).shape[0]
            loss_n += next(iter(inputs.values())).shape[0]
            if progress:
                sps = seen / max(time.perf_counter() - t0, 1e-9)
                progress(epoch * n_batches + b + 1, total_steps, f"epoch {epoch + 1} loss {loss_sum / loss_n:.4f} {sps:.0f} samples/s")
        if world > 1:  # every process's share of the loss: the same figure one process reports
            import torch.distributed as dist

            tot = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64, device=opts.device)
            dist.all_reduce(tot)
            loss_sum, loss_n = float(tot[0]), int(tot[1])
        model.eval()
        metric = evaluate(val)
        rec = EpochRecord(epoch + 1, round(loss_sum / max(loss_n, 1), 6), round(metric, 6),
                          round(seen / max(time.perf_counter() - t0, 1e-9), 1))
        history.append(rec)
        if metric > best[0]:
            best = (metric, epoch + 1, {n: p.detach().clone() for n, p in params})
        if resume_file is not None and rank == 0:
            state = {"epoch": epoch + 1, "params": {n: p.detach().clone() for n, p in params},
                     "options": json.dumps(fingerprint, sort_keys=True),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": torch.get_rng_state(), "gen": gen.get_state(),
                     "history": [asdict(h) for h in history], "best_metric": best[0], "best_epoch": best[1],
                     "best_params": best[2]}
            try:
                with atomic_path(resume_file, force=True, pickle_name_ok=True) as tmp:
                    torch.save(state, tmp)
            except OSError as e:
                raise WriteError(f"cannot save the training state ({e})", resume_file) from e
    by_name = dict(params)
    for n, v in best[2].items():
        by_name[n].data.copy_(v)
    model.eval()
    return FitResult(history, best[1], round(best[0], 6), metric_name, start_epoch, initial_metric=round(initial, 6),
                     extra={"dropped_batches_per_epoch": n_batches - per_rank_batches * world} if world > 1 else {})


@torch.no_grad()
def predict(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], ds: Dataset, batch_size: int, device: str) -> torch.Tensor:
    """Outputs of ``fn`` over a dataset, batch by batch, on the CPU."""
    outs = [fn(_to(inputs, device)).float().cpu() for inputs, _ in ds.batches(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else float("nan")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): KL(softmax(t/T) ‖ softmax(s/T)) · T², batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * (t * t)


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and KL(teacher ‖ student) for logits."""
    return {
        "top1_agreement": float((student.argmax(-1) == teacher.argmax(-1)).float().mean()),
        "kl": float(F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")),
    }


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())
