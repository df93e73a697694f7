"""Compose study: can two LoRA domain adapters on the shipped DigitsCNN be composed so that the
composed adapter is within 5 points of each single adapter on that adapter's domain, while each
single adapter gains >= 20 points over the base there?

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/compose_study.py [--out bench-out/compose-study]
        [--pair digits-inverted,digits-rotated] [--only A C E J]

``--pair`` runs the same study on any two named image sets (default: inverted + rotated, as
before), e.g. the milder ``digits-noisy,digits-contrast``.

Library-only (lorasurgeon.finetune.attach_lora, compose.compose_adapters, merge.merge_adapters);
the base file is never written. Splits are those of benchmarks/results_digits.py (seed 0, 20% test,
10% val); all digits-* sets are transforms of the same 1797 images with the same permutation, so
the test indices are never trained on by any adapter in any domain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorasurgeon.compose import compose_adapters
from lorasurgeon.data import NAMED_SETS, load_dataset, split
from lorasurgeon.finetune import attach_lora
from lorasurgeon.merge import merge_adapters
from lorasurgeon.nn.models import load_model
from lorasurgeon.train import TrainOptions
from lorasurgeon.zoo import digits_cnn_weights

ARCH = "lorasurgeon.zoo:digits_cnn"
SPLIT = dict(val_split=0.1, test_split=0.2, seed=0)
DOMS = ("digits-inverted", "digits-rotated")
EVAL_SETS = ("digits",) + DOMS + ("mnist5k",)  # eval_sets(DOMS)
IMG = {"mnist5k": 8}  # mnist5k is 28x28; the CNN takes 8x8 (area resize, as --image-size 8)
TEACHER = digits_cnn_weights()

SHORT = {"digits-inverted": "inv", "digits-rotated": "rot"}  # short names in config labels


def short(d: str) -> str:
    return SHORT.get(d, d.removeprefix("digits-"))


def make_configs(doms: tuple[str, str]) -> dict[str, dict]:
    """Pair configs: name -> (per-domain (targets, heads)), note. For the default pair the names
    read 'inv'/'rot' as always; for another pair they use the set's name without 'digits-'."""
    a, b = short(doms[0]), short(doms[1])
    cfgs: dict[str, dict] = {
        "A head=classifier (benchmark)": dict(spec={d: (None, ["classifier"]) for d in doms},
                                              note="LoRA on conv1-4, classifier trained fully, saved as modules_to_save"),
        "B no saved head, LoRA incl. classifier": dict(spec={d: (None, []) for d in doms},
                                                       note="heads=[] -> default targets '*' also wrap classifier with LoRA (CLI default for --arch)"),
        "C conv-only, base head frozen/shared": dict(spec={d: (["conv*"], []) for d in doms},
                                                     note="-t 'conv*', no --head: classifier untouched, shared"),
        f"D1 {a} conv1-2 | {b} conv3-4": dict(spec={doms[0]: (["conv1", "conv2"], []), doms[1]: (["conv3", "conv4"], [])},
                                             note="layer-disjoint, head frozen"),
        f"D2 {a} conv3-4 | {b} conv1-2": dict(spec={doms[0]: (["conv3", "conv4"], []), doms[1]: (["conv1", "conv2"], [])},
                                             note="layer-disjoint, head frozen"),
        f"D3 {a} conv1 | {b} conv2-4": dict(spec={doms[0]: (["conv1"], []), doms[1]: (["conv2", "conv3", "conv4"], [])},
                                           note="layer-disjoint, head frozen"),
        "E conv-only + clean-digits replay": dict(spec={d: (["conv*"], []) for d in doms}, mixed=True,
                                                  note="each adapter trained on its domain's train split + clean digits train split "
                                                       "(scratch .safetensors data file; no test index), head frozen"),
        f"F1 replay + {a} conv1 | {b} conv2-4": dict(spec={doms[0]: (["conv1"], []), doms[1]: (["conv2", "conv3", "conv4"], [])},
                                                    mixed=True, note="E's clean replay + D3's layer split"),
        f"F2 replay + {a} conv1-2 | {b} conv3-4": dict(spec={doms[0]: (["conv1", "conv2"], []), doms[1]: (["conv3", "conv4"], [])},
                                                      mixed=True, note="E's clean replay + D1's layer split"),
    }
    if "mnist5k" not in doms:
        m0, m1 = (doms[0], "mnist5k"), (doms[1], "mnist5k")
        cfgs.update({
            f"M1 {a} + mnist5k, conv-only": dict(doms=m0, spec={d: (["conv*"], []) for d in m0},
                                                 note="other named shifted set (mnist5k at 8x8), head frozen"),
            f"M2 {b} + mnist5k, conv-only": dict(doms=m1, spec={d: (["conv*"], []) for d in m1},
                                                 note="other named shifted set (mnist5k at 8x8), head frozen"),
            f"M3 {a} + mnist5k, head=classifier": dict(doms=m0, spec={d: (None, ["classifier"]) for d in m0},
                                                       note="as A, other pair"),
            f"M4 {a} + mnist5k, conv-only + replay": dict(doms=m0, spec={d: (["conv*"], []) for d in m0},
                                                          mixed=True, note="as E, other pair"),
        })
    return cfgs


def eval_sets(doms: tuple[str, str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(("digits",) + doms + ("mnist5k",)))


CONFIGS: dict[str, dict] = make_configs(DOMS)
METHODS = [  # (label, method, weights, kwargs)
    ("cat 1,1", "cat", [1.0, 1.0], {}),
    ("cat .5,.5", "cat", [0.5, 0.5], {}),
    ("svd r8", "svd", None, {"rank": 8}),
    ("svd r16", "svd", None, {"rank": 16}),
    ("ties d.5", "ties", None, {"density": 0.5}),
    ("dare_ties d.5", "dare_ties", None, {"density": 0.5, "seed": 0}),
]

_TEST: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def set_pair(doms: tuple[str, str]) -> None:
    """Run the study on another pair of named domain sets (the default pair changes nothing)."""
    global DOMS, EVAL_SETS, CONFIGS
    if doms != DOMS:
        DOMS, EVAL_SETS, CONFIGS = doms, eval_sets(doms), make_configs(doms)


def test_set(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    if data not in _TEST:
        _, _, t = split(load_dataset(data, image_size=IMG.get(data)), SPLIT["val_split"], SPLIT["seed"], SPLIT["test_split"])
        _TEST[data] = (t.inputs["x"], t.labels)
    return _TEST[data]


def acc(weights: Path | str, data: str) -> float:
    lm = load_model(weights, arch=ARCH)
    x, y = test_set(data)
    with torch.no_grad():
        return round(float((lm.model(x).argmax(-1) == y).float().mean()), 4)


def accs(weights: Path | str) -> dict[str, float]:
    return {d: acc(weights, d) for d in EVAL_SETS}


def merged(base: Path | str, adapters: list[Path], out: Path) -> Path:
    merge_adapters(base, adapters, out, force=True)
    return out


def mixed_file(doms: tuple[str, ...], out: Path) -> Path:
    """Train+val portion (canonical seed-0 split, test excluded) of each of ``doms``."""
    xs, ys = [], []
    for d in doms:
        ds = load_dataset(d, image_size=IMG.get(d))
        n = len(ds)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT["seed"]))
        keep = perm[round(n * SPLIT["test_split"]):]
        xs.append(ds.inputs["x"][keep])
        ys.append(ds.labels[keep])
    save_file({"x": torch.cat(xs).contiguous(), "y": torch.cat(ys).contiguous()}, str(out))
    return out


def train(base: Path | str, data: str | Path, out: Path, targets, heads, epochs: int, test_split: float) -> dict:
    opts = TrainOptions(epochs=epochs, lr=3e-3, batch_size=64, val_split=0.1, test_split=test_split, seed=0)
    r = attach_lora(base, data, out, arch=ARCH, rank=8, targets=targets, heads=heads, opts=opts, force=True,
                    image_size=IMG.get(str(data)))
    return {"targets": r.targets, "heads": r.heads, "trainable_params": r.trainable_params,
            "attach_test_accuracy": r.test_accuracy}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/compose-study")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--only", nargs="*", help="config name prefixes (A, B, ...)")
    ap.add_argument("--results", default=None, help="where the JSON goes (default: OUT/results.json)")
    ap.add_argument("--pair", default=",".join(DOMS),
                    help=f"two named domain sets, comma-separated (default {','.join(DOMS)}), e.g. digits-noisy,digits-contrast")
    args = ap.parse_args()
    pair = tuple(p.strip() for p in args.pair.split(","))
    if len(pair) != 2 or pair[0] == pair[1] or not all(p in NAMED_SETS and p != "bbcnews" for p in pair):
        ap.error(f"--pair takes two different named image sets from {', '.join(n for n in NAMED_SETS if n != 'bbcnews')}")
    set_pair(pair)
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    sha_before = hashlib.sha256(Path(TEACHER).read_bytes()).hexdigest()
    res: dict = {"pair": list(DOMS), "base": accs(TEACHER), "configs": {}}
    print("base", res["base"], flush=True)
    for cname, cfg in CONFIGS.items():
        if args.only and not any(cname.startswith(p) for p in args.only):
            continue
        tag = cname.split()[0]
        row: dict = {"note": cfg["note"], "single": {}, "composed": {}}
        ads = []
        doms = cfg.get("doms", DOMS)
        row["doms"] = list(doms)
        for d in doms:
            targets, heads = cfg["spec"][d]
            a = out / f"{tag}-{d}"
            if cfg.get("mixed"):
                info = train(TEACHER, mixed_file((d, "digits"), out / f"{tag}-{d}-data.safetensors"), a, targets, heads, args.epochs, 0.0)
            else:
                info = train(TEACHER, d, a, targets, heads, args.epochs, SPLIT["test_split"])
            info["acc"] = accs(merged(TEACHER, [a], out / f"{tag}-{d}-merged.safetensors"))
            row["single"][d] = info
            ads.append(a)
        for label, method, w, kw in METHODS:
            c = out / f"{tag}-{method}-{label.replace(' ', '_').replace(',', '_')}"
            try:
                compose_adapters(ads, c, method, weights=w, force=True, **kw)
                row["composed"][label] = accs(merged(TEACHER, [c], out / f"{c.name}-merged.safetensors"))
            except Exception as e:  # noqa: BLE001 - record and go on
                row["composed"][label] = {"error": f"{type(e).__name__}: {e}"}
        res["configs"][cname] = row
        print(cname, json.dumps(row["single"]), json.dumps(row["composed"]), flush=True)
    # sequential reference (NOT composition): 2nd-domain adapter trained on base + merged config-C 1st-domain adapter
    if not args.only or "S" in args.only:
        a, b = short(DOMS[0]), short(DOMS[1])
        inv = out / f"S-{a}"
        train(TEACHER, DOMS[0], inv, ["conv*"], [], args.epochs, SPLIT["test_split"])
        base2 = merged(TEACHER, [inv], out / "S-base2.safetensors")
        rot = out / f"S-{b}"
        info = train(base2, DOMS[1], rot, ["conv*"], [], args.epochs, SPLIT["test_split"])
        res["sequential (NOT composition)"] = {f"after_{a}": accs(base2),
                                               f"after_{a}_then_{b}": accs(merged(base2, [rot], out / "S-final.safetensors")),
                                               f"{b}_info": info}
        print("sequential", json.dumps(res["sequential (NOT composition)"]), flush=True)
    # joint multi-domain adapter (NOT composition): one conv-only adapter on both domains' + clean train splits
    if not args.only or "J" in args.only:
        j = out / "J-joint"
        info = train(TEACHER, mixed_file(DOMS + ("digits",), out / "J-data.safetensors"), j, ["conv*"], [], args.epochs, 0.0)
        res["joint (NOT composition)"] = {"acc": accs(merged(TEACHER, [j], out / "J-merged.safetensors")), "info": info}
        print("joint", json.dumps(res["joint (NOT composition)"]), flush=True)
    res["base_sha256_unchanged"] = hashlib.sha256(Path(TEACHER).read_bytes()).hexdigest() == sha_before
    res["seconds"] = round(time.perf_counter() - t0, 1)
    # goal check
    goal = {}
    for cname, row in res["configs"].items():
        for label, comp in row["composed"].items():
            if "error" in comp:
                continue
            ok = all(row["single"][d]["acc"][d] - res["base"][d] >= 0.20 and row["single"][d]["acc"][d] - comp[d] <= 0.05
                     for d in row["doms"])
            gap = max(row["single"][d]["acc"][d] - comp[d] for d in row["doms"])
            goal[f"{cname} / {label}"] = {"meets_goal": ok, "worst_gap": round(gap, 4)}
    res["goal"] = goal
    Path(args.results or out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(goal, indent=1))
    print("seconds", res["seconds"], "base unchanged", res["base_sha256_unchanged"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
