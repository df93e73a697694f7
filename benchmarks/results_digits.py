"""Digits CNN results (issue: train (b), (d); data-aware factorization, digits part).

    .venv/bin/python benchmarks/results_digits.py [--out bench-out/digits] [--markdown]

(b) The shipped DigitsCNN (teacher) is factorized to <= 35% of its conv/linear parameters
    (global --budget 0.35), plainly and with svd-llm calibration, then distilled on the training
    split; test accuracy of each, against the teacher's.
(d) Two domain adapters (inverted and rotated digits) trained with LoRA on the frozen base, each
    scored on its domain's test split against the base; then the two composed with `compose cat`
    and scored on both domains.
Every split is the one the teacher was trained with (seed 0: 20% test, 10% validation), so no
test example is ever trained on or used for choosing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from lorasurgeon.calibrate import CalibrationOptions
from lorasurgeon.compose import compose_adapters
from lorasurgeon.data import load_dataset, split
from lorasurgeon.factorize import factorize_checkpoint
from lorasurgeon.finetune import attach_lora, distill_student
from lorasurgeon.merge import merge_adapters
from lorasurgeon.nn.models import load_model
from lorasurgeon.train import TrainOptions
from lorasurgeon.zoo import digits_cnn_weights

ARCH = "lorasurgeon.zoo:digits_cnn"
SPLIT = dict(val_split=0.1, test_split=0.2, seed=0)


def test_accuracy(weights: Path | str, data: str) -> float:
    lm = load_model(weights, arch=ARCH)
    _, _, test = split(load_dataset(data), SPLIT["val_split"], SPLIT["seed"], SPLIT["test_split"])
    with torch.no_grad():
        pred = lm.model(test.inputs["x"]).argmax(-1)
    return round(float((pred == test.labels).float().mean()), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    teacher = digits_cnn_weights()
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    rows["teacher"] = {"test_accuracy": test_accuracy(teacher, "digits")}
    inc = ["conv*", "classifier"]
    for name, cal in (("plain", None), ("svd-llm", CalibrationOptions("digits", "svd-llm", samples=1000, heldout=0, arch=ARCH))):
        f = out / f"fact-{name}.safetensors"
        r = factorize_checkpoint(teacher, f, budget=0.35, include=inc, svd_method="exact", calibration=cal)
        frac = r.factorized_params_after / r.factorized_params_before
        rows[f"factorized {name}"] = {"params_fraction": round(frac, 4), "test_accuracy": test_accuracy(f, "digits")}
        d = out / f"distilled-{name}.safetensors"
        dr = distill_student(teacher, f, "digits", d, arch=ARCH, opts=TrainOptions(epochs=args.epochs, lr=1e-3, batch_size=64, **SPLIT))
        rows[f"factorized {name} + distill"] = {"params_fraction": round(frac, 4), "test_accuracy": test_accuracy(d, "digits"),
                                                "test_agreement": dr.test["top1_agreement"]}
    # (d) domain adapters
    domains = ("digits-inverted", "digits-rotated")
    adapters = []
    for dom in domains:
        a = out / f"lora-{dom}"
        ar = attach_lora(teacher, dom, a, arch=ARCH, rank=8, heads=["classifier"],
                         opts=TrainOptions(epochs=args.epochs, lr=3e-3, batch_size=64, **SPLIT))
        adapters.append(a)
        rows[f"base on {dom}"] = {"test_accuracy": test_accuracy(teacher, dom)}
        rows[f"adapter {dom}"] = {"test_accuracy": ar.test_accuracy, "trained_params": ar.trainable_params}
    comp = out / "composed"
    compose_adapters(adapters, comp, method="cat")
    merged = out / "composed-merged.safetensors"
    merge_adapters(teacher, [comp], merged)
    for dom in domains:
        rows[f"composed on {dom}"] = {"test_accuracy": test_accuracy(merged, dom)}
    rows["_seconds"] = {"total": round(time.perf_counter() - t0, 1)}
    print(json.dumps(rows, indent=2))
    if args.markdown:
        print("\n| model | test accuracy | note |\n|---|---:|---|")
        for k, v in rows.items():
            if k.startswith("_"):
                continue
            note = ", ".join(f"{a}={b}" for a, b in v.items() if a != "test_accuracy")
            print(f"| {k} | {v['test_accuracy']:.4f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
