"""Data-aware factorization: plain, asvd, svd-llm and fwsvd side by side, before and after distill.

    .venv/bin/python benchmarks/calibrated.py --model digits [--markdown]       # a few minutes
    .venv/bin/python benchmarks/calibrated.py --model minilm [--markdown]       # see results_minilm.py

digits: the shipped DigitsCNN, every conv and the classifier factorized under one global
``--budget`` (default 0.35 of their parameters), with each method's calibration on 1,000
training images (fwsvd uses the labels). Each factorization runs as the CLI in a subprocess, so
its wall time and peak resident memory (VmHWM, from /proc at exit through GNU time) are the
command's own. Then each student is distilled (KL at T = 2, 30 epochs) and the test accuracy of
both is reported. Splits are the teacher's (seed 0: 20% test never seen, 10% validation).

minilm: all-MiniLM-L6-v2 on bbcnews; the cosine table comes from
``results_minilm.py --part compress`` (the same library calls); this script adds each method's
calibration time and peak memory at ratio 0.25 measured as above.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

METHODS = ("svd", "asvd", "svd-llm", "fwsvd")
ARCH = "lorasurgeon.zoo:digits_cnn"


def cli() -> str:
    return str(Path(sys.executable).parent / "lorasurgeon")


def timed(cmd: list[str]) -> tuple[dict, float, float]:
    """Run a lorasurgeon command with --json; (result, wall s, peak MB by GNU time, else ru_maxrss)."""
    t0 = time.perf_counter()
    gnu = shutil.which("time") or "/usr/bin/time"
    if Path(gnu).exists():
        p = subprocess.run([gnu, "-f", "%M", *cmd], capture_output=True, text=True)
        peak = float(p.stderr.strip().splitlines()[-1]) / 1024 if p.returncode == 0 else float("nan")
    else:
        p = subprocess.run(cmd, capture_output=True, text=True)
        peak = float("nan")
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout), wall, peak


def digits(out: Path, budget: float, epochs: int, threads: int) -> dict:
    from results_digits import SPLIT, test_accuracy

    from lorasurgeon.finetune import distill_student
    from lorasurgeon.train import TrainOptions
    from lorasurgeon.zoo import digits_cnn_weights

    teacher = digits_cnn_weights()
    rows: dict[str, dict] = {"teacher": {"test_accuracy": test_accuracy(teacher, "digits")}}
    for m in METHODS:
        f = out / f"f-{m}.safetensors"
        cmd = [cli(), "factorize", teacher, "-o", str(f), "--budget", str(budget), "--include", "conv*",
               "--include", "classifier", "--svd", "exact", "--json", "--quiet", "--force"]
        if m != "svd":
            cmd += ["--arch", ARCH, "--calibration", "digits", "--method", m, "--calibration-samples", "1000",
                    "--heldout-samples", "0"]
        r, wall, peak = timed(cmd)
        frac = r["factorized_params_after"] / r["factorized_params_before"]
        d = out / f"d-{m}.safetensors"
        dr = distill_student(teacher, f, "digits", d, arch=ARCH, force=True,
                             opts=TrainOptions(epochs=epochs, lr=1e-3, batch_size=64, **SPLIT))
        rows[m] = {"params_fraction": round(frac, 4), "test_accuracy": test_accuracy(f, "digits"),
                   "test_accuracy_distilled": test_accuracy(d, "digits"),
                   "test_agreement_distilled": dr.test["top1_agreement"], "factorize_seconds": round(wall, 1),
                   "factorize_peak_mb": round(peak)}
        print(json.dumps({m: rows[m]}), flush=True)
    return rows


def minilm_cost(out: Path, ratio: float) -> dict:
    from results_minilm import minilm, write_splits

    train, _ = write_splits(out)
    rows = {}
    for m in METHODS:
        cmd = [cli(), "factorize", minilm(), "-o", str(out / f"f-{m}"), "--ratio", str(ratio), "--json", "--quiet", "--force"]
        if m != "svd":
            cmd += ["--calibration", str(train), "--method", m, "--calibration-samples", "128", "--heldout-samples", "0"]
        _, wall, peak = timed(cmd)
        rows[m] = {"factorize_seconds": round(wall, 1), "factorize_peak_mb": round(peak)}
        shutil.rmtree(out / f"f-{m}", ignore_errors=True)
        print(json.dumps({m: rows[m]}), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits", "minilm"), required=True)
    ap.add_argument("--out", default=None, help="scratch folder (default bench-out/calibrated-MODEL)")
    ap.add_argument("--budget", type=float, default=0.35, help="digits: global parameter budget")
    ap.add_argument("--ratio", type=float, default=0.25, help="minilm: ratio for the cost measurement")
    ap.add_argument("--epochs", type=int, default=30, help="digits: distillation epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or REPO / "bench-out" / f"calibrated-{args.model}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = digits(out, args.budget, args.epochs, args.threads) if args.model == "digits" else minilm_cost(out, args.ratio)
    print(json.dumps(rows, indent=2))
    if args.markdown:
        keys = sorted({k for r in rows.values() for k in r})
        print("| method | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
