"""``lorasurgeon export``: parse options, call ``export_model``, render."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorasurgeon.cli.options import ForceOpt, JsonOpt, QuietOpt, output_path
from lorasurgeon.cli.output import handle_errors, human_bytes, log, print_json, stdout_console
from lorasurgeon.export import DEFAULT_OPSET, ExportResult, Timing, export_model, parse_input_shape

PANEL_VERIFY = "Verification"
PANEL_BENCH = "Benchmark"


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, parser=output_path, metavar="<path>", help="The .onnx file to write.")],
    model: Annotated[Path | None, typer.Argument(readable=False, help="A Hugging Face model folder (dense or factorized), or the weights for --arch.")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="module:factory building the model for a checkpoint (e.g. lorasurgeon.zoo:mlp).")] = None,
    adapter: Annotated[list[Path] | None, typer.Option("--adapter", "-a", readable=False, help="LoRA adapter merged into the weights before export (repeatable).")] = None,
    separate_adapters: Annotated[bool, typer.Option("--separate-adapters", help="Keep adapters apart: one onnxruntime .onnx_adapter per adapter beside the output, switchable at run time.")] = False,
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="Adapter targets that match no module become a warning.")] = False,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="One sample's shape without the batch axis, e.g. 1,8,8 (tensor inputs; inferred when omitted).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (13-20).")] = DEFAULT_OPSET,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 | fp16 (weights and compute; inputs and outputs stay fp32).")] = "fp32",
    optimize: Annotated[bool, typer.Option("--optimize", help="Save onnxruntime's graph optimizations (transformer fusions for BERT-like encoders) into the file.")] = False,
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8: onnxruntime dynamic quantization, gated by task agreement.")] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="Max |ONNX - PyTorch| allowed, plus --rtol times the largest |output| (default 1e-4 fp32, 1e-2 fp16); above it: exit 3, nothing written.", rich_help_panel=PANEL_VERIFY)] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Allowed |ONNX - PyTorch| relative to the batch's largest |output| (default 0 fp32, 5e-3 fp16).", rich_help_panel=PANEL_VERIFY)] = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="Gate for --quantize: mean cosine (embeddings, default 0.99) or top-1 agreement (logits, default 0.98).", rich_help_panel=PANEL_VERIFY)] = None,
    benchmark: Annotated[bool, typer.Option("--benchmark", help="Time PyTorch eager and onnxruntime (median, p90).", rich_help_panel=PANEL_BENCH)] = False,
    baseline: Annotated[Path | None, typer.Option("--baseline", readable=False, help="A (dense) model exported and timed in the same run; reports the speedup. Implies --benchmark.", rich_help_panel=PANEL_BENCH)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Benchmark batch size.", rich_help_panel=PANEL_BENCH)] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Benchmark sequence length (text models).", rich_help_panel=PANEL_BENCH)] = 128,
    threads: Annotated[int, typer.Option("--threads", help="Intra-op threads for onnxruntime and PyTorch.", rich_help_panel=PANEL_BENCH)] = 2,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs first.", rich_help_panel=PANEL_BENCH)] = 5,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs of each model and runtime, interleaved.", rich_help_panel=PANEL_BENCH)] = 20,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a model to ONNX, verify it against PyTorch in onnxruntime, optionally optimize,
    quantize and benchmark it."""
    with handle_errors(json_out):
        shape = parse_input_shape(input_shape) if input_shape is not None else None
        result = export_model(
            model, output, arch=arch, adapters=adapter or [], allow_unmatched=allow_unmatched,
            separate_adapters=separate_adapters, input_shape=shape, opset=opset, dtype=dtype, atol=atol, rtol=rtol,
            optimize=optimize, quantize=quantize, min_agreement=min_agreement, benchmark=benchmark,
            baseline=baseline, batch_size=batch_size, seq_len=seq_len, threads=threads, warmup=warmup,
            runs=runs, force=force, log=lambda m: log(m, quiet),
        )
        print_json(result.to_json()) if json_out else render(result)


def _ms(t: Timing | None) -> tuple[str, str]:
    return ("-", "-") if t is None else (f"{t.median_ms:.2f}", f"{t.p90_ms:.2f}")


def render(r: ExportResult) -> None:
    con = stdout_console()
    say = functools.partial(con.print, markup=False)
    say(f"wrote {r.output} ({human_bytes(r.bytes)}, opset {r.opset}, {r.dtype}"
              + (f", {r.quantized}" if r.quantized else "") + (f", optimized by {r.optimized}" if r.optimized else "") + ")")
    if r.external_data:
        say(f"weights in {r.external_data} (external data: the model passes 2 GB); keep both files together")
    say("inputs: " + ", ".join(f"{i['name']} [{', '.join(map(str, i['shape']))}]" for i in r.inputs)
              + f"   output: {r.outputs[0]['name']}")
    say(f"graph: {r.nodes} nodes, {r.matmul_nodes} MatMul/Gemm as exported"
              + (f" ({r.factorized_layers} factorized layers, each two MatMuls or two Convs)" if r.factorized_layers else ""))
    if r.fused_ops:
        say("fused: " + ", ".join(f"{k} {v}" for k, v in r.fused_ops.items()))
    if r.adapters:
        say(f"adapters ({r.adapter_mode}): " + ", ".join(r.adapters))
    for f in r.adapter_files:
        say(f"adapter file: {f}")
    v = r.verification
    tol = f"atol {v.atol:g}" + (f" + rtol {v.rtol:g} × max|ref|" if v.rtol else "")
    t = Table(title=f"Verification: onnxruntime ({v.provider}) vs {v.reference}, {tol}", title_justify="left")
    for c in ("input shape", "max abs error", "max rel error"):
        t.add_column(c, justify="right")
    for c in v.cases:
        t.add_row("x".join(map(str, c.shape)), f"{c.max_abs_error:.3g}", f"{c.max_rel_error:.3g}")
    con.print(t)
    say(f"verification: {'passed' if v.passed else 'FAILED'} (max abs {v.max_abs_error:.3g}, max rel {v.max_rel_error:.3g})")
    for av, f in zip(r.adapter_verification, r.adapter_files):
        say(f"  with {Path(f).name} active: max abs {av.max_abs_error:.3g} ({'passed' if av.passed else 'FAILED'})")
    if r.agreement:
        a = r.agreement
        say(f"int8 agreement: {a.metric} {a.value:.4f} on {a.samples} samples (gate {a.min:g}): "
                  f"{'passed' if a.passed else 'FAILED'}; max abs error {a.max_abs_error:.3g}")
    b = r.benchmark
    if b is None:
        return
    shape = f"batch {b.batch_size}" + (f" x {b.seq_len} tokens" if b.seq_len else "")
    bt = Table(title=f"Latency at {shape}, {b.threads} thread(s), {b.runs} runs after {b.warmup} warm-up (ms)", title_justify="left")
    for c in ("model", "runtime", "median", "p90", "file"):
        bt.add_column(c, justify="left" if c in ("model", "runtime") else "right")
    bt.add_row("this", "pytorch eager", *_ms(b.pytorch), "")
    bt.add_row("this", "onnxruntime", *_ms(b.onnxruntime), human_bytes(r.bytes))
    if b.baseline:
        bt.add_row("baseline", "pytorch eager", *_ms(b.baseline.pytorch), "")
        bt.add_row("baseline", "onnxruntime", *_ms(b.baseline.onnxruntime), human_bytes(b.baseline.bytes))
    con.print(bt)
    say(f"onnxruntime vs pytorch: {b.onnxruntime_vs_pytorch:.2f}x")
    if b.speedup_vs_baseline is not None:
        say(f"speedup vs baseline: onnxruntime {b.speedup_vs_baseline:.2f}x, pytorch {b.pytorch_speedup_vs_baseline:.2f}x")
    say(f"load average (1 min) before/after: {b.load_average[0]:.2f} / {b.load_average[1]:.2f}")
