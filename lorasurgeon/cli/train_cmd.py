"""``lorasurgeon attach`` and ``lorasurgeon distill``: parse options, call one library function, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorasurgeon.cli.options import ForceOpt, JsonOpt, QuietOpt, output_path
from lorasurgeon.cli.output import handle_errors, log, print_json, progress, stdout_console
from lorasurgeon.errors import InvalidOptionError
from lorasurgeon.finetune import AttachResult, DistillResult, attach_lora, distill_student
from lorasurgeon.train import TrainOptions

T = "Training"
D = "Data"
ArchOpt = Annotated[str | None, typer.Option("--arch", help="module:factory building the model (its weights are MODEL).")]
DataOpt = Annotated[str, typer.Option("--data", help="Named set (digits, digits-inverted, digits-rotated, digits-shifted, digits-noisy, digits-contrast, mnist5k, bbcnews), image folder, .csv/.jsonl, .safetensors/.npz.", rich_help_panel=D)]
TextColOpt = Annotated[str, typer.Option("--text-column", rich_help_panel=D)]
LabelColOpt = Annotated[str, typer.Option("--label-column", rich_help_panel=D)]
MaxLenOpt = Annotated[int, typer.Option("--max-length", help="Tokens per text.", rich_help_panel=D)]
ImgOpt = Annotated[int | None, typer.Option("--image-size", help="Resize images to this square size.", rich_help_panel=D)]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use the first N examples (fixed shuffle).", rich_help_panel=D)]
ValOpt = Annotated[float, typer.Option("--val-split", help="Validation fraction (deterministic by --seed).", rich_help_panel=D)]
TestOpt = Annotated[float, typer.Option("--test-split", help="Held-out test fraction, scored once at the end.", rich_help_panel=D)]
EpochsOpt = Annotated[int, typer.Option("--epochs", rich_help_panel=T)]
LrOpt = Annotated[float, typer.Option("--lr", rich_help_panel=T)]
BsOpt = Annotated[int, typer.Option("--batch-size", rich_help_panel=T)]
AccOpt = Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.", rich_help_panel=T)]
WdOpt = Annotated[float, typer.Option("--weight-decay", rich_help_panel=T)]
SeedOpt = Annotated[int, typer.Option("--seed", rich_help_panel=T)]
DevOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | auto.", rich_help_panel=T)]
SchedOpt = Annotated[str, typer.Option("--schedule", help="Learning rate after warm-up: constant | linear | cosine (both decay to 0).", rich_help_panel=T)]
WarmOpt = Annotated[float, typer.Option("--warmup", help="Fraction of the optimizer steps spent warming up linearly (step k of w at (k+1)/w of --lr).", rich_help_panel=T)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the state saved after the last finished epoch.", rich_help_panel=T)]


def register(app: typer.Typer) -> None:
    app.command("attach")(attach_command)
    app.command("distill")(distill_command)


def attach_command(
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output PEFT adapter folder (a model with --full).")],
    model: Annotated[Path | None, typer.Argument(readable=False, help="Hugging Face model folder, or the weights for --arch.")] = None,
    data: DataOpt = "digits",
    arch: ArchOpt = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", metavar="<glob>", help="Glob over module names to adapt (repeatable; default: every Linear, Conv2d or GPT-2 Conv1D but the head).")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r")] = 8,
    alpha: Annotated[float | None, typer.Option("--alpha", help="LoRA alpha (default: the rank).")] = None,
    dropout: Annotated[float, typer.Option("--dropout")] = 0.0,
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale alpha/sqrt(r) instead of alpha/r.")] = False,
    head: Annotated[list[str] | None, typer.Option("--head", metavar="<module>", help="Module trained fully and saved as modules_to_save (repeatable; default: the new classifier/score head of a Hugging Face model, none for --arch models).")] = None,
    no_head: Annotated[bool, typer.Option("--no-head", help="Train and save no head: keep the model's own (LoRA goes only where --target says).")] = False,
    full: Annotated[bool, typer.Option("--full", help="Fine-tune every weight instead (for comparison).")] = False,
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched")] = False,
    epochs: EpochsOpt = 3, lr: LrOpt = 1e-3, batch_size: BsOpt = 32, grad_accum: AccOpt = 1, weight_decay: WdOpt = 0.0,
    seed: SeedOpt = 0, val_split: ValOpt = 0.1, test_split: TestOpt = 0.0, max_length: MaxLenOpt = 128,
    text_column: TextColOpt = "text", label_column: LabelColOpt = "label", image_size: ImgOpt = None, limit: LimitOpt = None,
    device: DevOpt = "cpu", schedule: SchedOpt = "constant", warmup: WarmOpt = 0.0, resume: ResumeOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Attach LoRA adapters to a model and train them on a labelled dataset."""
    with handle_errors(json_out):
        if no_head and head:
            raise InvalidOptionError("--head and --no-head contradict each other")
        opts = TrainOptions(epochs, lr, batch_size, grad_accum, weight_decay, seed, val_split, test_split, max_length, device,
                            schedule, warmup)
        with progress("attach", quiet) as cb:
            r = attach_lora(model, data, output, arch=arch, targets=target, rank=rank, alpha=alpha, dropout=dropout,
                            rslora=rslora, heads=[] if no_head else head, full=full, opts=opts, text_column=text_column,
                            label_column=label_column, image_size=image_size, limit=limit, resume=resume, force=force,
                            allow_unmatched=allow_unmatched, progress=cb)
        for w in r.extra.get("warnings", []):
            log(f"warning: {w}", quiet)
        _warn_dropped(r.fit, quiet)
        log(f"wrote {output}", quiet)
        print_json(r.to_json()) if json_out else render_attach(r)


def distill_command(
    teacher: Annotated[Path, typer.Option("--teacher", readable=False, help="The original model (folder, or weights for --arch).")],
    student: Annotated[Path, typer.Option("--student", readable=False, help="Its factorized checkpoint or folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="Output factorized checkpoint (folder for a folder student).")],
    data: DataOpt = "digits",
    arch: ArchOpt = None,
    loss: Annotated[str, typer.Option("--loss", help="auto | kl | mse | cosine (auto: kl for classifiers, cosine for encoders).")] = "auto",
    temperature: Annotated[float, typer.Option("--temperature", "-T")] = 2.0,
    train_bias_norm: Annotated[bool, typer.Option("--train-bias-norm", help="Also train every bias (dense layers too) and the norm layers.")] = False,
    feature_loss: Annotated[float, typer.Option(
        "--feature-loss", help="Add this weight times each factorized layer's relative output error against the "
        "teacher's same layer (intermediate-layer distillation); 0 turns it off.")] = 0.0,
    epochs: EpochsOpt = 3, lr: LrOpt = 1e-4, batch_size: BsOpt = 32, grad_accum: AccOpt = 1, weight_decay: WdOpt = 0.0,
    seed: SeedOpt = 0, val_split: ValOpt = 0.1, test_split: TestOpt = 0.0, max_length: MaxLenOpt = 128,
    text_column: TextColOpt = "text", label_column: LabelColOpt = "label", image_size: ImgOpt = None, limit: LimitOpt = None,
    device: DevOpt = "cpu", schedule: SchedOpt = "constant", warmup: WarmOpt = 0.0, resume: ResumeOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Train a factorized student to match its teacher's outputs (labels optional)."""
    with handle_errors(json_out):
        opts = TrainOptions(epochs, lr, batch_size, grad_accum, weight_decay, seed, val_split, test_split, max_length, device,
                            schedule, warmup)
        with progress("distill", quiet) as cb:
            r = distill_student(teacher, student, data, output, arch=arch, loss=loss, temperature=temperature,
                                train_bias_norm=train_bias_norm, feature_loss=feature_loss, opts=opts, text_column=text_column, label_column=label_column,
                                image_size=image_size, limit=limit, resume=resume, force=force, progress=cb)
        _warn_dropped(r.fit, quiet)
        log(f"wrote {output}", quiet)
        print_json(r.to_json()) if json_out else render_distill(r)


def _warn_dropped(fit: dict, quiet: bool) -> None:
    n = fit.get("extra", {}).get("dropped_batches_per_epoch")
    if n:
        log(f"warning: {n} batch(es) per epoch were left out so that every process takes the same number of steps "
            "(torchrun); a --batch-size that divides the training split evenly trains on all of it", quiet)


def _history(fit: dict, metric: str) -> Table:
    t = Table(title="Epochs", title_justify="left")
    for c in ("epoch", "train loss", metric, "samples/s"):
        t.add_column(c, justify="right")
    for h in fit["history"]:
        best = " *" if h["epoch"] == fit["best_epoch"] else ""
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", f"{h['val_metric']:.4f}{best}", f"{h['samples_per_s']:.0f}")
    return t


def render_attach(r: AttachResult) -> None:
    con = stdout_console()
    if r.targets:
        con.print(f"adapted {len(r.targets)} modules: " + ", ".join(r.targets[:8]) + (" ..." if len(r.targets) > 8 else ""))
    con.print(f"trainable parameters: {r.trainable_params:,} of {r.total_params:,}")
    con.print(_history(r.fit, "val accuracy"))
    con.print(f"validation accuracy: {r.val_accuracy_before:.4f} before, {r.val_accuracy:.4f} after (best epoch {r.fit['best_epoch']})"
              + (f"; test accuracy {r.test_accuracy:.4f}" if r.test_accuracy is not None else ""))


def render_distill(r: DistillResult) -> None:
    con = stdout_console()
    con.print(f"loss: {r.loss}" + (f" (T={r.temperature:g})" if r.loss == "kl" else "") + f"; trainable parameters {r.trainable_params:,}")
    con.print(_history(r.fit, r.fit["metric_name"]))
    for k in r.after:
        con.print(f"{k}: {r.before[k]:.4f} -> {r.after[k]:.4f} (validation)")
    for k, v in (r.test or {}).items():
        con.print(f"test {k}: {(r.test_before or {}).get(k, float('nan')):.4f} -> {v:.4f}")
    best = r.fit["best_epoch"]
    con.print(f"best epoch {best}" + (" (the starting student: no epoch validated better, the output equals the input)"
                                      if best == 0 else ""))
