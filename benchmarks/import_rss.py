"""How the page cache holds torch's shared libraries changes ``import torch``'s peak resident set.

Peak RSS (VmHWM, GNU time's ``%M``) counts the file pages a process maps. When the kernel keeps
a file in large folios, a page fault maps the whole folio, so the same ``import torch`` maps more.
Files read with ``read()`` (``cat``, a copy, a hash) are cached in large folios; files first
brought in by ``mmap`` faults (an import) in small ones. This script measures ``python -c
"import torch"`` three ways, each after evicting torch's libraries from the page cache
(``posix_fadvise(DONTNEED)``, no privileges needed; it works only while no process maps them):

  faulted  evicted, then imported twice: the libraries come in by mmap faults (the usual state)
  read     evicted, read whole with 16 MiB ``read()`` calls, then imported
  restored evicted again and imported (back to the usual state for later benchmarks)

Every memory target here that counts ``import torch`` (merge under 500 MB, inspect under
300 MB) depends on this: run benchmarks in the ``faulted`` state. MB = 10^6 bytes.

    .venv/bin/python benchmarks/import_rss.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MB, measure_peak_rss, venv_python  # noqa: E402


def torch_libs() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None
    return sorted(p for p in (Path(spec.origin).parent / "lib").glob("*.so*") if p.is_file())


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_whole(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def peak_mb(py: str) -> float:
    r = measure_peak_rss([py, "-c", "import torch"], use_gnu_time=True)
    return max(x for x in (r.vmhwm_mb, r.gnu_time_mb) if x is not None)


def main() -> int:
    py = str(venv_python())
    libs = torch_libs()
    size = sum(f.stat().st_size for f in libs)
    print(f"torch libraries: {len(libs)} files, {size / MB:,.0f} MB")
    evict(libs)
    peak_mb(py)  # brings them in by mmap faults
    faulted = peak_mb(py)
    evict(libs)
    read_whole(libs)
    read = peak_mb(py)
    evict(libs)
    peak_mb(py)
    restored = peak_mb(py)
    print(f"{'state':<10} {'import torch peak MB':>22}")
    for name, v in (("faulted", faulted), ("read", read), ("restored", restored)):
        print(f"{name:<10} {v:>22.0f}")
    print(f"read / faulted: {read / faulted:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
