"""The demo's closing table: each artefact's size, fidelity and speed, from the JSON results the
pipeline kept (examples/pipeline.mk)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def main() -> int:
    out, minilm, digits = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    r = {p.name[: -len(".json")]: json.loads(p.read_text()) for p in out.glob("*.json")}
    t = Table(title="lorasurgeon demo: artefacts", title_justify="left")
    for c in ("artefact", "size", "fidelity", "speed"):
        t.add_column(c, justify="left" if c in ("artefact", "fidelity") else "right")
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    kb = lambda n: f"{n / 1e3:.0f} KB"  # noqa: E731
    dense, fact = r["minilm.onnx"]["benchmark"], r["minilm-d35.onnx"]["benchmark"]
    f35 = r["minilm-f35"]
    t.add_row("MiniLM (original)", mb(size(minilm / "model.safetensors")), "reference", "")
    t.add_row("MiniLM factorized, ratio 0.35, svd-llm", mb(size(out / "minilm-f35" / "model.safetensors")),
              f"held-out cosine {f35['extra']['fidelity']['mean_cosine']:.3f}", "")
    d = r["minilm-d35"]
    t.add_row("  + distilled on unlabelled bbcnews", mb(size(out / "minilm-d35" / "model.safetensors")),
              f"val cosine {d['before']['mean_cosine']:.3f} -> {d['after']['mean_cosine']:.3f}", "")
    t.add_row("MiniLM dense, ONNX", mb(r["minilm.onnx"]["bytes"]),
              f"max |ORT-PyTorch| {r['minilm.onnx']['verification']['max_abs_error']:.1e}",
              f"{dense['onnxruntime']['median_ms']:.0f} ms (8x128)")
    t.add_row("MiniLM factorized+distilled, ONNX", mb(r["minilm-d35.onnx"]["bytes"]),
              f"max |ORT-PyTorch| {r['minilm-d35.onnx']['verification']['max_abs_error']:.1e}",
              f"{fact['onnxruntime']['median_ms']:.0f} ms ({dense['onnxruntime']['median_ms'] / fact['onnxruntime']['median_ms']:.2f}x)")
    t.add_row("DigitsCNN (shipped)", kb(size(digits)), "", "")
    for dom in ("inverted", "rotated"):
        a = r[dom]
        t.add_row(f"  LoRA for digits-{dom}", kb(size(out / dom / "adapter_model.safetensors")),
                  f"test acc {a['test_accuracy']:.3f} (val {a['val_accuracy_before']:.3f} before)", "")
    t.add_row("  merged (inverted)", kb(size(out / "cnn-inverted.safetensors")),
              f"max ‖ΔW‖/‖W‖ {max(x['relative_update'] for x in r['cnn-inverted']['layers']):.2f}", "")
    c = r["composed"]
    t.add_row("  composed (cat, both)", kb(size(out / "composed" / "adapter_model.safetensors")), "exact sum of both deltas", "")
    t.add_row("  kohya copy, and back to PEFT", kb(size(out / "inverted-kohya.safetensors")),
              f"delta change {r['inverted-back']['max_abs_delta_diff']:.1e}", "")
    Console(width=120).print(t)
    del c
    return 0


if __name__ == "__main__":
    sys.exit(main())
