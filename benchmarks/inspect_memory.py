"""Peak resident memory of ``lorasurgeon inspect PATH --json`` on a ~2 GiB checkpoint.

Builds one synthetic checkpoint (fp16 4096x8192 matrices plus small 1-D tensors) in three
forms under ``--dir`` (default ``bench-out/``, git-ignored):

  safetensors  one ``model.safetensors`` file
  sharded      a Hugging Face folder: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  pt           a ``torch.save`` (zip) state dict ``model.pt``

then runs ``lorasurgeon inspect PATH --json`` on each as a subprocess and measures its peak
resident set (see ``_common.measure_peak_rss``: ``os.wait4`` ru_maxrss with a forked child,
polled ``VmHWM``, GNU time ``%M``; the largest is reported). The same run measures baselines:
``python -c "import torch"``, ``python -c "import lorasurgeon.cli.app"`` and
``lorasurgeon --version``, and prints each form's peak against them. The JSON's totals must
equal the known tensor, parameter and byte counts.

Exit status: 0 when every form peaks at or under ``--limit-mb`` and its totals are right;
1 otherwise. MB = 10^6 bytes.

    .venv/bin/python benchmarks/inspect_memory.py [--size-gb 2.0] [--limit-mb 300] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    FORMS,
    MB,
    REPO,
    form_path,
    gnu_time_path,
    layer_specs,
    make_form_subprocess,
    markdown_table,
    measure_best,
    path_size,
    totals,
    venv_python,
    venv_script,
)

_FORM_DIRS = {"safetensors": "single", "sharded": "sharded", "pt": "pt"}

# Negative controls (--control): readers that keep whole-file mappings resident. If the
# measurement did not count mapped file pages, these would look as small as inspect.
_CONTROL = {
    "safetensors": (
        "import sys\nfrom safetensors import safe_open\n"
        "with safe_open(sys.argv[1], 'pt') as f:\n"
        "    ts = [f.get_tensor(k) for k in f.keys()]\n"
        "    s = [float(t.sum()) for t in ts]\n"
    ),
    "sharded": (
        "import sys, pathlib\nfrom safetensors.torch import load_file\n"
        "sds = [load_file(p) for p in sorted(pathlib.Path(sys.argv[1]).glob('*.safetensors'))]\n"
        "s = [float(t.sum()) for sd in sds for t in sd.values()]\n"
    ),
    "pt": (
        "import sys, torch\n"
        "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True, mmap=True)\n"
        "s = [float(t.sum()) for t in sd.values()]\n"
    ),
}


def _manifest(root: Path) -> dict:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _check_totals(stdout: str, want: dict[str, int]) -> tuple[bool, str]:
    try:
        got = json.loads(stdout)["totals"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return False, f"no JSON totals ({type(e).__name__})"
    bad = [f"{k} {got.get(k)} != {v}" for k, v in want.items() if got.get(k) != v]
    return (not bad), ("ok" if not bad else "; ".join(bad))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dir", type=Path, default=REPO / "bench-out", help="scratch folder (default: bench-out/)"
    )
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GiB (default 2.0)")
    ap.add_argument(
        "--limit-mb", type=float, default=300.0, help="fail when a form peaks above this (MB, default 300)"
    )
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated subset of {','.join(FORMS)}")
    ap.add_argument(
        "--shard-mb", type=float, default=500.0, help="shard size of the sharded form (MB, default 500)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per command; the highest peak is reported")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse checkpoints left by --keep when their size matches"
    )
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument(
        "--control",
        action="store_true",
        help="also run a deliberately bad reader on each form (whole-file mmap, every tensor touched) "
        "to show that the measurement counts mapped file pages; it is expected to exceed the limit",
    )
    a = ap.parse_args(argv)

    forms = [f.strip() for f in a.forms.split(",") if f.strip()]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        ap.error(f"unknown form(s) {unknown}; choose from {list(FORMS)}")
    root: Path = a.dir.resolve()
    specs = layer_specs(a.size_gb)
    want = totals(specs)
    shard_bytes = int(a.shard_mb * MB)
    config = {"size_gb": a.size_gb, "shard_bytes": shard_bytes, "seed": 0, "totals": want}
    py = venv_python()
    cli = venv_script("lorasurgeon")

    print(
        f"synthetic checkpoint: {want['tensors']} tensors, {want['params']:,} parameters, "
        f"{want['bytes'] / MB:,.0f} MB; scratch {root}",
        file=sys.stderr,
    )
    print(
        f"measuring with: wait4 (forked child), VmHWM polling, GNU time: {gnu_time_path() or 'not found'}",
        file=sys.stderr,
    )

    # Baselines first, before anything is written.
    baselines = {
        "import torch": [py, "-c", "import torch"],
        "import lorasurgeon.cli.app": [py, "-c", "import lorasurgeon.cli.app"],
        "lorasurgeon --version": [cli, "--version"],
    }
    base: dict[str, float] = {}
    base_rows = []
    for label, cmd in baselines.items():
        r, _ = measure_best(cmd, a.repeat)
        if r.returncode != 0:
            print(
                f"baseline {label!r} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}", file=sys.stderr
            )
            return 1
        base[label] = r.peak_mb
        base_rows.append(r)

    # Make the forms (in a separate maker process: this one stays lean) and measure each.
    root.mkdir(parents=True, exist_ok=True)
    old = _manifest(root) if a.reuse else {}
    made: list[Path] = []
    results = []
    controls = []
    failed = False
    try:
        for form in forms:
            p = form_path(root, form)
            fdir = root / _FORM_DIRS[form]
            if a.reuse and old.get("config") == config and form in old.get("forms", []) and p.exists():
                print(f"reusing {form}: {p}", file=sys.stderr)
            else:
                if fdir.exists():
                    shutil.rmtree(fdir)
                t0 = time.perf_counter()
                make_form_subprocess(root, form, a.size_gb, shard_bytes)
                print(f"made {form} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
                man = _manifest(root)
                man_forms = set(man.get("forms", [])) if man.get("config") == config else set()
                (root / "manifest.json").write_text(
                    json.dumps({"config": config, "forms": sorted(man_forms | {form})}, indent=2) + "\n"
                )
            made.append(fdir)
            r, _ = measure_best([cli, "inspect", str(p), "--json"], a.repeat)
            ok_totals, why = (
                _check_totals(r.stdout, want) if r.returncode == 0 else (False, f"exit {r.returncode}")
            )
            if r.returncode != 0:
                print(f"inspect {form} failed: {r.stderr.strip()[-800:]}", file=sys.stderr)
            over = r.peak_mb > a.limit_mb
            failed |= over or not ok_totals
            results.append((form, path_size(p), r, ok_totals, why, over))
            if a.control:
                c, _ = measure_best([py, "-c", _CONTROL[form], str(p)], 1)
                controls.append((form, path_size(p), c))
    finally:
        if not a.keep:
            for fdir in made:
                shutil.rmtree(fdir, ignore_errors=True)
            (root / "manifest.json").unlink(missing_ok=True)
            try:
                root.rmdir()  # only when nothing else is left in it
            except OSError:
                pass

    # Report.
    torch_mb = base["import torch"]
    app_mb = base["import lorasurgeon.cli.app"]
    head = [
        "run",
        "on disk MB",
        "peak MB",
        "wait4",
        "VmHWM",
        "GNU time",
        "vs import torch",
        "vs CLI import",
        "wall s",
        "totals",
        f"<= {a.limit_mb:.0f}",
    ]
    rows = []
    for label, r in zip(baselines, base_rows, strict=True):
        rows.append(
            [
                label,
                "-",
                f"{r.peak_mb:.0f}",
                f"{r.wait4_mb:.0f}",
                _f(r.vmhwm_mb),
                _f(r.gnu_time_mb),
                f"{round(r.peak_mb - torch_mb):+d}",
                f"{round(r.peak_mb - app_mb):+d}",
                f"{r.wall_s:.2f}",
                "-",
                "-",
            ]
        )
    for form, size, r, _ok, why, over in results:
        rows.append(
            [
                f"inspect {form}",
                f"{size / MB:,.0f}",
                f"{r.peak_mb:.0f}",
                f"{r.wait4_mb:.0f}",
                _f(r.vmhwm_mb),
                _f(r.gnu_time_mb),
                f"{round(r.peak_mb - torch_mb):+d} ({r.peak_mb / torch_mb:.2f}x)",
                f"{round(r.peak_mb - app_mb):+d}",
                f"{r.wall_s:.2f}",
                why,
                "FAIL" if over else "ok",
            ]
        )
    for form, size, c in controls:
        rows.append(
            [
                f"control: mmap+touch {form}",
                f"{size / MB:,.0f}",
                f"{c.peak_mb:.0f}",
                f"{c.wait4_mb:.0f}",
                _f(c.vmhwm_mb),
                _f(c.gnu_time_mb),
                f"{round(c.peak_mb - torch_mb):+d} ({c.peak_mb / torch_mb:.2f}x)",
                f"{round(c.peak_mb - app_mb):+d}",
                f"{c.wall_s:.2f}",
                "-" if c.returncode == 0 else f"exit {c.returncode}",
                "(control)",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join
    print(line(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print(
            line(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(
        f"\npeak = max(wait4, VmHWM, GNU time), MB = 10^6 bytes; measuring parent RSS at spawn "
        f"{max(r.parent_rss_mb for r in base_rows + [x[2] for x in results]):.0f} MB; "
        f"{want['tensors']} tensors, {want['params']:,} parameters, {want['bytes'] / MB:,.0f} MB of tensor data"
    )
    if a.markdown:
        print()
        print(markdown_table(head, rows))
    if failed:
        bad = [
            f"{f} ({r.peak_mb:.0f} MB{', totals: ' + why if not ok else ''})"
            for f, _, r, ok, why, over in results
            if over or not ok
        ]
        print(f"FAIL: over {a.limit_mb:.0f} MB or wrong totals: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


if __name__ == "__main__":
    sys.exit(main())
