"""Speed, exactness and peak memory of ``merge`` and ``compose svd`` against their baselines.

Two parts (``--parts``, default both), each measured against a baseline in the same run:

  merge    ``lorasurgeon merge BASE.safetensors ADAPTER -o OUT.safetensors --quiet`` of a rank-16
           PEFT adapter targeting every 2-D weight (32 modules ``layers.{i}.proj``) into a 2 GiB
           fp16 checkpoint of 32 4096x8192 layers, against the I/O floor ``cp BASE OUT2 && sync OUT2``.
           Page cache warm for both: the base is read once before each timed run. Interleaved
           repeats. Peak resident memory of merge (``_common.measure_peak_rss``) against
           ``python -c "import torch; import lorasurgeon.cli.app"``. Targets: merge within 1.5x of
           the copy; peak under 500 MB.
  compose  ``compose_adapters([4 adapters], out, "svd", rank=32)`` of four rank-32 PEFT adapters on
           4 layers 4096x4096 (fp32, different alphas and weights) against the dense randomized route
           (form Σ w_i s_i B_i A_i densely in fp32, ``torch.svd_lowrank(q=64, niter=2)``). Accuracy
           of both against the exact SVD of the dense sum (fp64). Targets: >= 10x faster; ours exact
           (top-32 singular values within 1e-4 relative, error equal to the optimal rank-32 error).

Timing: wall seconds and CPU seconds (user+system; a subprocess's from ``wait4``), ratios for
both; the machine may be shared, so CPU seconds are the steadier figure and the load average is
printed. torch runs with 2 threads (``--threads``), subprocesses with OMP_NUM_THREADS /
MKL_NUM_THREADS set likewise; idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, KMP_BLOCKTIME=0)
unless ``--spin-wait``.

Exit status 0 when every target of the parts run is met, 1 otherwise. MB = 10^6 bytes.

    .venv/bin/python benchmarks/adapters.py [--quick] [--parts merge,compose] [--repeat N]
        [--dir bench-out] [--keep] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Before torch loads its OpenMP runtimes (see docs/benchmarks.md); --spin-wait keeps the defaults.
if "--spin-wait" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")

import torch  # noqa: E402
from _common import (  # noqa: E402
    MB,
    REPO,
    Report,
    Timing,
    layer_specs,
    load_note,
    lora_factors,
    lowrank_fro,
    make_form_subprocess,
    measure_peak_rss,
    median,
    path_size,
    product_singular_values,
    remove_path,
    run_timed,
    timed,
    trusted_peak_mb,
    venv_python,
    venv_script,
    warm_file,
    write_peft_adapter,
)
from safetensors.torch import load_file, save_file  # noqa: E402

from lorasurgeon.io.adapters import read_adapter  # noqa: E402

PARTS = ("merge", "compose")


REPORT = Report()


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


# ----------------------------------------------------------------------------- 5. merge


def part_merge(a: argparse.Namespace, root: Path) -> None:
    size = 0.25 if a.quick else 2.0
    rank = 16
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    py = venv_python()
    cli = venv_script("lorasurgeon")
    work = root / "merge"
    remove_path(work)
    base = make_form_subprocess(work, "safetensors", size)
    specs = [s for s in layer_specs(size) if len(s.shape) == 2]
    pairs = {
        s.name[: -len(".weight")]: lora_factors(s.shape[0], s.shape[1], rank, seed=100 + i, decay=0.5)
        for i, s in enumerate(specs)
    }
    adapter = write_peft_adapter(work / "adapter", pairs, rank, float(rank))
    out = work / "merged.safetensors"
    out2 = work / "copy.safetensors"
    merge_cmd = [cli, "merge", str(base), str(adapter), "-o", str(out), "--quiet", "--force"]
    copy_cmd = ["sh", "-c", f'cp "{base}" "{out2}" && sync "{out2}"']
    imp_cmd = [py, "-c", "import torch; import lorasurgeon.cli.app"]

    imp = measure_peak_rss(imp_cmd, env=env)
    merges, copies, imports = [], [], []
    # One untimed merge first: checks it works and leaves the same state of caches for every repeat.
    warm_file(base)
    first = measure_peak_rss(merge_cmd, env=env, use_gnu_time=False, timeout_s=3600)
    if first.returncode != 0:
        print(first.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"merge failed (exit {first.returncode})")
    for i in range(a.repeat):
        remove_path(out2)
        warm_file(base)
        copies.append(run_timed(copy_cmd, env=env))
        remove_path(out)
        warm_file(base)
        last = i == a.repeat - 1
        r = measure_peak_rss(merge_cmd, env=env, use_gnu_time=last, timeout_s=3600)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"merge failed (exit {r.returncode})")
        merges.append(r)
        imports.append(run_timed(imp_cmd, env=env))
    # Part of the floor: the provenance sha256 of the base (GUIDE §2), page cache warm.
    from lorasurgeon.io.writer import sha256_file

    warm_file(base)
    _, sha_t = timed(sha256_file, base)
    # Independent check: merged = W + s·B·A (fp32, cast once) for two layers.
    from lorasurgeon.io.checkpoint import Checkpoint

    worst = 0.0
    with Checkpoint.open(base) as cb, Checkpoint.open(out) as co:
        for mod in sorted(pairs)[:2]:
            B, A = pairs[mod]
            W = cb.get(f"{mod}.weight")
            want = (W.float() + (B.float() @ A.float())).to(W.dtype)
            got = co.get(f"{mod}.weight")
            worst = max(worst, float((got.float() - want.float()).abs().max()))
    mw = median([r.wall_s for r in merges])
    cw = median([t.wall_s for t in copies])
    iw = median([t.wall_s for t in imports])
    peak = max(trusted_peak_mb(r) for r in merges)  # over every run and every method
    gt = next((r.gnu_time_mb for r in merges if r.gnu_time_mb is not None), None)
    rows = [
        ["cp BASE OUT2 && sync OUT2", f"{cw:.2f}", f"{median([t.cpu_s for t in copies]):.2f}", "1.00x", "-", "-", "-", "-"],
        [
            "lorasurgeon merge (CLI, incl. start-up)",
            f"{mw:.2f}",
            "-",
            f"{mw / cw:.2f}x",
            f"{peak:.0f}",
            f"{max(r.wait4_mb for r in merges):.0f}",
            _f(max((r.vmhwm_mb or 0) for r in merges)),
            _f(gt),
        ],
        ["python -c 'import torch; import lorasurgeon.cli.app'", f"{iw:.2f}", f"{median([t.cpu_s for t in imports]):.2f}", f"{iw / cw:.2f}x", f"{trusted_peak_mb(imp):.0f}", f"{imp.wait4_mb:.0f}", _f(imp.vmhwm_mb), _f(imp.gnu_time_mb)],
        ["merge minus start-up", f"{mw - iw:.2f}", "-", f"{(mw - iw) / cw:.2f}x", "-", "-", "-", "-"],
        ["sha256 of the base (provenance; in-process)", f"{sha_t.wall_s:.2f}", f"{sha_t.cpu_s:.2f}", f"{sha_t.wall_s / cw:.2f}x", "-", "-", "-", "-"],
    ]
    REPORT.table(
        f"merge: rank-{rank} PEFT adapter on {len(pairs)} layers into a {path_size(base) / MB:,.0f} MB fp16 checkpoint "
        f"(page cache warm, {a.repeat} interleaved repeats, medians; {load_note()})",
        ["run", "wall s", "cpu s", "vs copy", "peak MB", "wait4", "VmHWM", "GNU time"],
        rows,
    )
    print(
        f"peak = max(VmHWM, GNU time, wait4), wait4 only where it exceeds the measuring parent's RSS at spawn "
        f"({max(x.parent_rss_mb for x in [imp, *merges]):.0f} MB), since a forked child's ru_maxrss includes it"
    )
    print(f"merged weights equal W + s·B·A computed independently (fp32, cast once): max |diff| {worst:.3g} over 2 layers")
    REPORT.target("merge speed: within 1.5x of cp + sync", mw <= 1.5 * cw, f"{mw / cw:.2f}x ({mw:.2f} s vs {cw:.2f} s; start-up alone {iw:.2f} s)")
    REPORT.target("merge memory: peak under 500 MB", peak < 500, f"{peak:.0f} MB; import baseline {trusted_peak_mb(imp):.0f} MB")
    if not a.keep:
        remove_path(work)


# ----------------------------------------------------------------------------- 6. compose


def dense_compose(paths: Sequence[Path], weights: Sequence[float], dst: Path, k: int, seed: int = 0):
    """The dense randomized route: per module, Σ w_i s_i B_i A_i formed in fp32, then
    ``torch.svd_lowrank(q=2k, niter=2)``; S into B, scale 1. Returns {module: (B, A)} and the seconds
    inside svd_lowrank."""
    import time

    ads = []
    for p in paths:
        cfg = json.loads((p / "adapter_config.json").read_text())
        ads.append((cfg["lora_alpha"] / cfg["r"], load_file(str(p / "adapter_model.safetensors"))))
    torch.manual_seed(seed)
    stems = sorted(key[: -len(".lora_A.weight")] for key in ads[0][1] if key.endswith(".lora_A.weight"))
    out: dict[str, torch.Tensor] = {}
    got = {}
    s_svd = 0.0
    for stem in stems:
        delta = None
        for w, (s, sd) in zip(weights, ads, strict=True):
            d = sd[f"{stem}.lora_B.weight"].float() @ sd[f"{stem}.lora_A.weight"].float()
            d.mul_(w * s)
            delta = d if delta is None else delta.add_(d)
        t0 = time.perf_counter()
        U, S, V = torch.svd_lowrank(delta, q=2 * k, niter=2)
        s_svd += time.perf_counter() - t0
        B = (U[:, :k] * S[:k]).contiguous()
        A = V[:, :k].T.contiguous()
        out[f"{stem}.lora_A.weight"] = A
        out[f"{stem}.lora_B.weight"] = B
        got[stem[len("base_model.model.") :]] = (B, A)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": k, "lora_alpha": k}))
    return got, s_svd


def part_compose(a: argparse.Namespace, root: Path) -> None:
    dim = 1024 if a.quick else 4096
    nl, r, k = 4, 32, 32
    alphas = [32.0, 16.0, 64.0, 8.0]
    weights = [1.0, 0.5, 0.75, -0.25]
    work = root / "compose"
    remove_path(work)
    inputs = []
    all_pairs = []
    for j, alpha in enumerate(alphas):
        pairs = {f"layers.{i}.attn.q_proj": lora_factors(dim, dim, r, seed=1000 * j + i, decay=0.5) for i in range(nl)}
        all_pairs.append(pairs)
        inputs.append(write_peft_adapter(work / f"in{j}", pairs, r, alpha))
    warm_file(work)
    try:
        from lorasurgeon.compose import compose_adapters

        ours_route = "compose_adapters(method='svd', rank=32) (read, stack_factors + product_svd, write)"

        def ours(out: Path):
            return compose_adapters(inputs, out, "svd", weights=weights, rank=k)
    except ImportError:  # the command not there yet: the same algebra directly
        from lorasurgeon.ops import svd as _svd

        ours_route = "stack_factors + lowrank_svd (compose_adapters not available), read + save"

        def ours(out: Path):
            ads = [read_adapter(p) for p in inputs]
            tg = {}
            for mod in sorted(ads[0].targets):
                Bc, Ac = _svd.stack_factors([(ad.targets[mod].B, ad.targets[mod].A, w * ad.targets[mod].scale) for ad, w in zip(ads, weights, strict=True)])
                res = _svd.lowrank_svd(Bc, Ac, k)
                tg[f"base_model.model.{mod}.lora_B.weight"] = (res.U * res.S).contiguous()
                tg[f"base_model.model.{mod}.lora_A.weight"] = res.Vh.contiguous()
            out.mkdir(parents=True, exist_ok=True)
            save_file(tg, str(out / "adapter_model.safetensors"))
            (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": k, "lora_alpha": k}))

    ours_out = work / "ours"
    dense_out = work / "dense"
    ot: list[Timing] = []
    dt: list[Timing] = []
    ds: list[float] = []
    got_dense = {}
    for i in range(a.repeat + 1):
        remove_path(ours_out)
        _, t = timed(ours, ours_out)
        remove_path(dense_out)
        (got_dense, s_svd), td = timed(dense_compose, inputs, weights, dense_out, k)
        if i:
            ot.append(t)
            dt.append(td)
            ds.append(s_svd)
    res_ad = read_adapter(ours_out)
    rows = []
    worst_o = worst_d = 0.0
    worst_eo = 0.0
    for mod in sorted(all_pairs[0]):
        # exact reference: the dense weighted sum in fp64, full singular values
        delta = sum(w * (al / r) * (p[mod][0].double() @ p[mod][1].double()) for w, al, p in zip(weights, alphas, all_pairs, strict=True))
        s_exact = torch.linalg.svdvals(delta)
        t = res_ad.targets[mod]
        s_o = product_singular_values(t.B, t.A, t.scale)
        Bd, Ad = got_dense[mod]
        s_d = product_singular_values(Bd, Ad)
        rel_o = float(((s_o[:k] - s_exact[:k]).abs() / s_exact[:k]).max())
        rel_d = float(((s_d[:k] - s_exact[:k]).abs() / s_exact[:k]).max())
        nrm = float(s_exact.pow(2).sum().sqrt())
        opt = float(s_exact[k:].pow(2).sum().sqrt()) / nrm
        # ||Δ − Δ̂||_F from factors: stack every input (weighted, scaled) and minus the result
        Bs = torch.cat([p[mod][0].double() * (w * al / r) for w, al, p in zip(weights, alphas, all_pairs, strict=True)], 1)
        As = torch.cat([p[mod][1].double() for p in all_pairs], 0)
        e_o = lowrank_fro(torch.cat([Bs, -t.B.double() * t.scale], 1), torch.cat([As, t.A.double()], 0)) / nrm
        e_d = lowrank_fro(torch.cat([Bs, -Bd.double()], 1), torch.cat([As, Ad.double()], 0)) / nrm
        worst_o, worst_d = max(worst_o, rel_o), max(worst_d, rel_d)
        worst_eo = max(worst_eo, abs(e_o / opt - 1))
        rows.append([mod, f"{dim}x{dim}", f"{rel_o:.2e}", f"{rel_d:.2e}", f"{opt:.6f}", f"{e_o:.6f}", f"{e_d:.6f}", f"{(e_o / opt - 1) * 100:+.4f}%", f"{(e_d / opt - 1) * 100:+.3f}%"])
    ow, oc = median([x.wall_s for x in ot]), median([x.cpu_s for x in ot])
    dw, dc = median([x.wall_s for x in dt]), median([x.cpu_s for x in dt])
    REPORT.table(
        f"compose svd: 4 PEFT adapters rank {r} -> rank {k}, {nl} layers {dim}x{dim} fp32, weights {weights}, alphas {alphas} "
        f"({a.repeat} interleaved repeats, medians; {load_note()})",
        ["route", "wall s", "cpu s", "dense/ours wall", "dense/ours cpu"],
        [
            [f"ours: {ours_route}", f"{ow:.3f}", f"{oc:.3f}", f"{dw / ow:.1f}x", f"{dc / oc:.1f}x"],
            ["dense: load_file, Σ w s B@A dense fp32, svd_lowrank(q=2k, niter=2), save_file", f"{dw:.3f}", f"{dc:.3f}", "1.0x", "1.0x"],
            ["  of which inside svd_lowrank", f"{median(ds):.3f}", "-", "-", "-"],
        ],
    )
    REPORT.table(
        "compose svd: accuracy against the exact SVD of the dense weighted sum (fp64); σ rel = max_i |σ_i − σ*_i|/σ*_i over the top k; err = ||Δ − Δ̂||_F/||Δ||_F",
        ["module", "shape", "σ rel, ours", "σ rel, dense", "optimal err", "ours err", "dense err", "ours vs optimal", "dense vs optimal"],
        rows,
    )
    REPORT.target("compose exact: top-k singular values within 1e-4 relative and the optimal error", worst_o <= 1e-4 and worst_eo <= 1e-4, f"ours σ {worst_o:.2e}, error vs optimal {worst_eo:.1e}; dense route σ {worst_d:.2e}")
    REPORT.target("compose speed: >= 10x faster than the dense randomized route", min(dw / ow, dc / oc) >= 10, f"{dw / ow:.1f}x wall, {dc / oc:.1f}x cpu")
    if not a.keep:
        remove_path(work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shrink every size (a smoke run, not the targets)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as on CI)")
    ap.add_argument("--spin-wait", action="store_true", help="keep the OpenMP runtimes' spinning waits")
    ap.add_argument("--dir", type=Path, default=REPO / "bench-out", help="scratch folder (default bench-out/)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--markdown", action="store_true", help="also print each table as markdown")
    a = ap.parse_args(argv)
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {list(PARTS)}")
    torch.set_num_threads(a.threads)
    REPORT.markdown = a.markdown
    root = a.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, "
        f"KMP_BLOCKTIME={os.environ.get('KMP_BLOCKTIME', '-')}; {load_note()}; scratch {root}",
        flush=True,
    )
    fns = {"merge": part_merge, "compose": part_compose}
    for p in parts:
        fns[p](a, root)
    print(f"\nend: {load_note()}")
    code = REPORT.summary()
    if not a.keep:
        try:
            root.rmdir()
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
