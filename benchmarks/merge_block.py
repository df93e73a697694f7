"""Time of the streamed merge's per-weight kernel against its block size.

``ops/lora.py::merge_weight_stats`` converts a block of rows of W to fp32, checks it finite, adds
the rows of s·B·A with ``addmm_`` and converts back. This script times it on one 4096x8192 fp16
weight with a rank-16 update for several block sizes (``_BLOCK_ELEMS``, elements of fp32), the
median of 5 runs after one warm-up, and checks each result bit for bit against one whole-matrix
``W.float().addmm_(B, A).half()``. The rows per block never go below ``_MIN_BLOCK_ROWS``.

    .venv/bin/python benchmarks/merge_block.py [--threads 2]

Like the other scripts it sets ``OMP_WAIT_POLICY=PASSIVE`` (``--spin-wait`` keeps the default).
The 32x column is one weight's time times the 32 layers of the 2 GiB merge benchmark in
``benchmarks/adapters.py``. On this 2-core machine the 8 MB default was fastest; L2-sized blocks
(512 KB) were not (docs/benchmarks.md, merge section).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--spin-wait" not in sys.argv:  # before torch loads its OpenMP runtime, as in the other scripts
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")

import torch  # noqa: E402

from lorasurgeon.io.adapters import LoraTarget  # noqa: E402
from lorasurgeon.ops import lora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin-wait", action="store_true", help="keep the OpenMP runtime's spinning waits")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4096, 8192, generator=g).half()
    t = LoraTarget(module="w", A=torch.randn(16, 8192, generator=g), B=torch.randn(4096, 16, generator=g),
                   alpha=16.0, scale=1.0)
    ref = W.float().addmm_(t.B, t.A).half()
    out = torch.empty_like(W)
    default = lora._BLOCK_ELEMS
    print(f"threads {a.threads}; default _BLOCK_ELEMS {default} ({default * 4 // 1024} KB fp32), "
          f"_MIN_BLOCK_ROWS {lora._MIN_BLOCK_ROWS}")
    print(f"{'block elems':>12} {'KB fp32':>8} {'rows':>5} {'median ms':>10} {'min ms':>8} {'32x s':>6}  equal")
    try:
        for elems in (1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21):
            lora._BLOCK_ELEMS = elems
            lora.merge_weight_stats(W, [(t, 1.0)], out=out)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                got, _ = lora.merge_weight_stats(W, [(t, 1.0)], out=out)
                ts.append(time.perf_counter() - t0)
            rows = max(lora._MIN_BLOCK_ROWS, elems // W.shape[1])
            med = statistics.median(ts)
            mark = " (default)" if elems == default else ""
            print(f"{elems:>12} {elems * 4 // 1024:>8} {rows:>5} {med * 1e3:>10.1f} {min(ts) * 1e3:>8.1f} "
                  f"{32 * med:>6.2f}  {torch.equal(got, ref)}{mark}")
    finally:
        lora._BLOCK_ELEMS = default


if __name__ == "__main__":
    main()
