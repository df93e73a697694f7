"""Shared helpers for the benchmark scripts: peak-memory measurement of a subprocess and
synthetic checkpoint makers.

Peak memory
-----------
``measure_peak_rss(cmd)`` runs ``cmd`` and reports its peak resident set (the kernel's
high-water mark, which counts file pages mapped into the process as well as anonymous
memory) three ways:

* ``wait4``: ``os.wait4`` on the child returns its ``ru_maxrss``. Linux computes it as
  max(high-water mark of the image the child *exec'd*, high-water mark of the image it had
  *before* exec). ``subprocess.Popen`` and ``os.posix_spawn`` start children with vfork, where
  the pre-exec image is the parent's own address space, so ``ru_maxrss`` then reports the
  *parent's* lifetime peak (measured here: a Python parent that once touched 500 MB reports
  ``/bin/true`` at 524 MB). We therefore fork (``preexec_fn`` disables vfork), so the pre-exec
  image is a copy of the parent holding only the parent's *current* RSS, and we keep the
  parent lean (it never imports torch). ``parent_rss_mb`` is recorded so the reader can check
  that the figure cannot be the parent's.
* ``vmhwm``: ``VmHWM`` from ``/proc/<pid>/status``, polled every few ms until the child exits.
  It belongs to the exec'd image only, so it is immune to the above, but it is a lower bound:
  growth after the last poll is missed.
* ``gnu_time``: GNU time's ``%M`` (itself ``wait4`` from a ~1 MB C process), when
  ``/usr/bin/time`` is GNU time. Independent cross-check.

``peak_mb`` is the largest of the three: the conservative figure to compare with a limit.

Synthetic checkpoints
---------------------
``layer_specs`` lays out a checkpoint of about ``size_gib`` GiB: ``N`` fp16 matrices
(4096x8192 by default, 64 MiB each) plus small 1-D tensors per layer (an fp16 bias and an fp32
norm weight). ``write_safetensors`` and ``write_sharded_safetensors`` write the header first
and then each tensor in turn, so the maker never holds more than one tensor. ``write_torch_pt``
must build the whole dict for ``torch.save`` (zip format), which is fine: it runs in a separate
maker process (``python benchmarks/_common.py make ...``), never in the measured one and never in
the lean measuring parent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

MB = 1_000_000  # figures are reported in MB = 10^6 bytes (stricter than MiB against a limit)
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ----------------------------------------------------------------------------- memory


def _rss_kib_self() -> int:
    """Current RSS of this process in KiB (VmRSS)."""
    return _status_field(os.getpid(), "VmRSS") or 0


def _status_field(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status, or None once the process has released its memory."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None
    return None


def gnu_time_path() -> str | None:
    """``/usr/bin/time`` if it is GNU time (supports ``-f %M``), else None."""
    for cand in ("/usr/bin/time", shutil.which("gtime") or ""):
        if not cand or not os.path.exists(cand):
            continue
        try:
            r = subprocess.run(
                [cand, "-f", "%M", "true"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stderr.strip().splitlines()[-1].strip().isdigit():
            return cand
    return None


@dataclass
class PeakResult:
    """One measured run of a command."""

    cmd: list[str]
    returncode: int
    wall_s: float
    wait4_mb: float
    vmhwm_mb: float | None
    gnu_time_mb: float | None
    parent_rss_mb: float
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    @property
    def peak_mb(self) -> float:
        return max(x for x in (self.wait4_mb, self.vmhwm_mb, self.gnu_time_mb) if x is not None)

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("stdout")
        d.pop("stderr")
        d["peak_mb"] = self.peak_mb
        return d


def _force_fork() -> None:
    """A no-op preexec_fn: its presence makes subprocess fork instead of vfork (see module doc)."""


def measure_peak_rss(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_s: float = 0.002,
    use_gnu_time: bool = True,
    timeout_s: float = 600.0,
) -> PeakResult:
    """Run ``cmd`` and measure its peak resident memory (see the module docstring).

    The command runs twice when GNU time is available: once directly (``wait4`` and polled
    ``VmHWM``), once under ``/usr/bin/time -f %M``. Its stdout/stderr of the direct run are
    returned (written to temp files, so a large output cannot block on a full pipe).

    Raises:
        subprocess.TimeoutExpired: the command ran past ``timeout_s`` (it is killed).
    """
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        parent_kib = _rss_kib_self()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, preexec_fn=_force_fork)
        hwm: int | None = None
        while True:
            v = _status_field(proc.pid, "VmHWM")
            if v is not None:
                hwm = v if hwm is None else max(hwm, v)
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    gt_mb = None
    gt = gnu_time_path() if use_gnu_time else None
    if gt:
        with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
            subprocess.run(
                [gt, "-f", "%M", "-o", tf.name, *cmd],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout_s,
                check=False,
            )
            txt = Path(tf.name).read_text().strip().splitlines()
            if txt and txt[-1].strip().isdigit():
                gt_mb = int(txt[-1]) * 1024 / MB
    return PeakResult(
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        wait4_mb=ru.ru_maxrss * 1024 / MB,
        vmhwm_mb=None if hwm is None else hwm * 1024 / MB,
        gnu_time_mb=gt_mb,
        parent_rss_mb=parent_kib * 1024 / MB,
        stdout=stdout,
        stderr=stderr,
    )


def measure_best(cmd: Sequence[str], repeat: int = 1, **kw: object) -> tuple[PeakResult, list[PeakResult]]:
    """Run ``measure_peak_rss`` ``repeat`` times; return the run with the highest peak and all runs."""
    runs = [measure_peak_rss(cmd, **kw) for _ in range(max(1, repeat))]  # type: ignore[arg-type]
    return max(runs, key=lambda r: r.peak_mb), runs


def venv_python() -> str:
    """The interpreter to measure: the repo's .venv if present, else this one."""
    p = REPO / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def venv_script(name: str) -> str:
    """A console script of the repo's .venv (``lorasurgeon``), else one on PATH."""
    p = REPO / ".venv" / "bin" / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"console script {name!r} not found; run `make venv`")
    return found


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F16 | F32 | BF16

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * {"F16": 2, "BF16": 2, "F32": 4}[self.dtype]


def layer_specs(size_gib: float, rows: int = 4096, cols: int = 8192) -> list[TensorSpec]:
    """About ``size_gib`` GiB: N fp16 ``rows x cols`` matrices (``layers.{i}.proj.weight``), each
    with an fp16 bias (``rows``) and an fp32 norm weight (``cols``). N = round(size / matrix)."""
    mat = rows * cols * 2
    n = max(1, round(size_gib * 2**30 / mat))
    specs: list[TensorSpec] = []
    for i in range(n):
        specs.append(TensorSpec(f"layers.{i}.proj.weight", (rows, cols), "F16"))
        specs.append(TensorSpec(f"layers.{i}.proj.bias", (rows,), "F16"))
        specs.append(TensorSpec(f"layers.{i}.norm.weight", (cols,), "F32"))
    return specs


def totals(specs: Sequence[TensorSpec]) -> dict[str, int]:
    return {
        "tensors": len(specs),
        "params": sum(s.numel for s in specs),
        "bytes": sum(s.nbytes for s in specs),
    }


def make_tensor(spec: TensorSpec, seed: int = 0):  # -> torch.Tensor
    """Deterministic content for one tensor (seeded by its name). Imports torch lazily."""
    import zlib

    import torch

    dt = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[spec.dtype]
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    return (torch.randn(spec.shape, generator=g, dtype=torch.float32) * 0.02).to(dt)


def _tensor_bytes(t) -> memoryview:  # t: torch.Tensor
    import torch

    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _st_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors convention: data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, specs: Sequence[TensorSpec], seed: int = 0) -> None:
    """Write a safetensors file tensor by tensor: header first, then each tensor's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_st_header(specs, {"format": "pt"}))
        for s in specs:
            t = make_tensor(s, seed)
            f.write(_tensor_bytes(t))
            del t
    os.replace(tmp, path)


def write_sharded_safetensors(
    folder: Path, specs: Sequence[TensorSpec], shard_bytes: int, seed: int = 0
) -> list[str]:
    """Hugging Face layout: ``model-0000k-of-0000n.safetensors`` shards of at most
    ``shard_bytes`` (a tensor never spans shards) plus ``model.safetensors.index.json``."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    folder.mkdir(parents=True, exist_ok=True)
    n = len(groups)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups, strict=True):
        write_safetensors(folder / fname, group, seed)
        weight_map.update({s.name: fname for s in group})
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_torch_pt(path: Path, specs: Sequence[TensorSpec], seed: int = 0) -> None:
    """``torch.save`` (zip format) of a plain state dict. Holds the whole dict in memory."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {s.name: make_tensor(s, seed) for s in specs}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, tmp)
    del sd
    os.replace(tmp, path)


FORMS = ("safetensors", "sharded", "pt")


def form_path(root: Path, form: str) -> Path:
    """Where each form lives under the scratch folder (what ``inspect`` is given)."""
    return {
        "safetensors": root / "single" / "model.safetensors",
        "sharded": root / "sharded",
        "pt": root / "pt" / "model.pt",
    }[form]


def make_form(
    root: Path, form: str, specs: Sequence[TensorSpec], shard_bytes: int = 500 * MB, seed: int = 0
) -> Path:
    """Write one form of the synthetic checkpoint under ``root``; return the path to inspect."""
    p = form_path(root, form)
    if form == "safetensors":
        write_safetensors(p, specs, seed)
    elif form == "sharded":
        write_sharded_safetensors(p, specs, shard_bytes, seed)
    elif form == "pt":
        write_torch_pt(p, specs, seed)
    else:
        raise ValueError(f"unknown form {form!r}; choose from {FORMS}")
    return p


def make_form_subprocess(
    root: Path, form: str, size_gib: float, shard_bytes: int = 500 * MB, seed: int = 0
) -> Path:
    """Run ``make_form`` in a child interpreter, so the calling (measuring) process stays lean:
    it never imports torch nor holds tensor data."""
    cmd = [
        venv_python(),
        str(Path(__file__).resolve()),
        "make",
        form,
        "--dir",
        str(root),
        "--size-gb",
        repr(size_gib),
        "--shard-bytes",
        str(shard_bytes),
        "--seed",
        str(seed),
    ]
    subprocess.run(cmd, check=True)
    return form_path(root, form)


def path_size(p: Path) -> int:
    """Bytes on disk of a file, or of the files directly inside a folder."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return p.stat().st_size


def fmt_mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""

    def is_num(v: object) -> bool:
        return bool(re.fullmatch(r"[+\-]?[\d.,]+( \([\d.]+x\))?", str(v)))

    align = [
        "---:"
        if any(is_num(r[i]) for r in rows) and all(is_num(r[i]) or r[i] == "-" for r in rows)
        else ":---"
        for i in range(len(header))
    ]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Tables and target verdicts of a benchmark run, printed as text (and markdown)."""

    def __init__(self, markdown: bool = False) -> None:
        self.markdown = markdown
        self.verdicts: list[tuple[str, bool, str]] = []

    def table(self, title: str, head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        print(f"\n## {title}\n", flush=True)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        print("  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True)))
        for r in rows:
            print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if self.markdown:
            print()
            print(markdown_table(head, rows))
        sys.stdout.flush()

    def target(self, name: str, ok: bool, detail: str) -> None:
        self.verdicts.append((name, ok, detail))
        print(f"TARGET {'met   ' if ok else 'MISSED'} {name}: {detail}", flush=True)

    def summary(self) -> int:
        """Print every verdict; the exit status: 0 when every target was met, else 1."""
        print("\nSUMMARY")
        for n, ok, d in self.verdicts:
            print(f"  {'met   ' if ok else 'MISSED'}  {n}: {d}")
        return 0 if all(ok for _, ok, _ in self.verdicts) else 1


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Synthetic checkpoint maker (used by the benchmarks).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write one form of the synthetic checkpoint")
    mk.add_argument("form", choices=FORMS)
    mk.add_argument("--dir", type=Path, default=REPO / "bench-out")
    mk.add_argument("--size-gb", type=float, default=2.0, help="size in GiB (2**30 bytes)")
    mk.add_argument("--shard-bytes", type=int, default=500 * MB)
    mk.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    specs = layer_specs(a.size_gb)
    p = make_form(a.dir, a.form, specs, a.shard_bytes, a.seed)
    print(f"wrote {a.form}: {p} ({path_size(p) / MB:.0f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())


# ----------------------------------------------------------------------------- timing and inputs
# Added for benchmarks/factorize.py and benchmarks/adapters.py. Everything below imports torch
# lazily, so inspect_memory.py's measuring parent stays lean.


@dataclass
class Timing:
    """Wall-clock and CPU seconds of one call. ``cpu_s`` is this process's user+system time
    (all threads): on a shared machine it is much less sensitive to other load than ``wall_s``."""

    wall_s: float
    cpu_s: float


def timed(fn, *args, **kwargs):  # -> tuple[object, Timing]
    """Call ``fn(*args, **kwargs)``; return its result and the wall/CPU time it took."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, Timing(time.perf_counter() - t0, time.process_time() - c0)


def run_timed(cmd: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True) -> Timing:
    """Run a subprocess; its wall time and CPU time (user+sys of the child, from ``wait4``)."""
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_force_fork)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, stderr=err)
    return Timing(wall, ru.ru_utime + ru.ru_stime)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def load_note() -> str:
    """The 1/5/15-minute load averages and core count: how contended the machine was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def warm_file(path: Path, chunk: int = 16 << 20) -> float:
    """Read a file (or a folder's files) once, so it sits in the page cache; returns seconds."""
    t0 = time.perf_counter()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    buf = bytearray(chunk)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def copy_fsync(src: Path, dst: Path, chunk: int = 16 << 20) -> None:
    """The I/O floor of any rewrite: copy ``src`` to ``dst`` and fsync it (``cp`` + ``sync``)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
        while True:
            n = fi.readinto(buf)
            if not n:
                break
            fo.write(view[:n])
        os.fsync(fo.fileno())


def random_orthonormal(rows: int, cols: int, generator):  # -> torch.Tensor (rows, cols), rows >= cols
    """Q of the QR of a Gaussian (rows x cols) matrix in fp32: orthonormal columns, Haar-like."""
    import torch

    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float32)).Q


def spectrum_matrix(rows: int, cols: int, S, seed: int = 0):  # -> torch.Tensor
    """``U diag(S) V^T`` (rows x cols, fp32) with random orthonormal U (rows x p), V (cols x p),
    p = len(S) <= min(rows, cols): a matrix with exactly the singular values S (up to fp32 rounding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = S.numel()
    U = random_orthonormal(rows, p, g)
    V = random_orthonormal(cols, p, g)
    W = (U * S.to(torch.float32)) @ V.T
    del U, V
    return W.contiguous()


def write_tensors_safetensors(path: Path, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from a list of (name, shape, dtype, make): the header first, then
    each tensor, produced by ``make()``, written and dropped in turn (like write_safetensors)."""
    import torch

    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    specs = [TensorSpec(n, tuple(shape), names[dt]) for n, shape, dt, _ in tensors]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_st_header(specs, {"format": "pt", **(metadata or {})}))
        for n, shape, dt, make in tensors:
            t = make()
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise ValueError(f"{n}: made {tuple(t.shape)} {t.dtype}, planned {shape} {dt}")
            f.write(_tensor_bytes(t))
            del t
    os.replace(tmp, path)


def lora_factors(out_dim: int, in_dim: int, rank: int, seed: int, decay: float = 1.0, dtype=None):
    """A LoRA pair B (out x r), A (r x in) whose product has a decaying spectrum: A has Gaussian
    rows scaled 1/sqrt(in), B Gaussian columns scaled by (i+1)^-decay. Deterministic in ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, in_dim, generator=g) / in_dim**0.5
    B = torch.randn(out_dim, rank, generator=g) * (torch.arange(1, rank + 1, dtype=torch.float32) ** -decay) * 0.05
    dt = dtype or torch.float32
    return B.to(dt).contiguous(), A.to(dt).contiguous()


def write_peft_adapter(
    folder: Path,
    pairs: dict[str, tuple[object, object]],
    rank: int,
    alpha: float,
) -> Path:
    """A PEFT LoRA folder: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r).
    ``pairs`` maps module -> (B, A)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(pairs),
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "task_type": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    items = []
    for mod in sorted(pairs):
        B, A = pairs[mod]
        items.append((f"base_model.model.{mod}.lora_A.weight", tuple(A.shape), A.dtype, (lambda A=A: A)))
        items.append((f"base_model.model.{mod}.lora_B.weight", tuple(B.shape), B.dtype, (lambda B=B: B)))
    items.sort(key=lambda x: x[0])
    write_tensors_safetensors(folder / "adapter_model.safetensors", items)
    return folder


def remove_path(p: Path) -> None:
    """Delete a file or folder if present."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def product_singular_values(B, A, scale: float = 1.0):  # -> torch.Tensor, fp64, descending
    """Singular values of ``scale · B · A`` (B out×k, A k×in) without forming the product: the
    eigenvalues of the k×k matrix (BᵀB)(AAᵀ) are the squared singular values (no orthonormality
    of either factor is assumed). Computed in fp64."""
    import torch

    b, a = B.reshape(B.shape[0], -1).double(), A.reshape(A.shape[0], -1).double()
    ev = torch.linalg.eigvals((b.T @ b) @ (a @ a.T)).real.clamp_min(0)
    return (ev.sqrt() * abs(scale)).sort(descending=True).values


def lowrank_fro(B, A) -> float:
    """||B · A||_F in fp64 from the factors: sqrt(sum((BᵀB) ∘ (AAᵀ)))."""
    b, a = B.reshape(B.shape[0], -1).double(), A.reshape(A.shape[0], -1).double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


def trusted_peak_mb(r: PeakResult) -> float:
    """``r.peak_mb`` without ``wait4`` when that figure may be the measuring parent's own RSS.

    ``ru_maxrss`` of a forked child is max(its exec'd image's peak, the parent's RSS at fork). A
    parent that imported torch (the factorize/adapters benchmarks do) is ~230-350 MB, so a small
    child (``python -c "import torch"``) would read as the parent. ``wait4`` is kept only when it
    exceeds the parent's RSS at spawn; VmHWM and GNU time are always the child's own."""
    own = [x for x in (r.vmhwm_mb, r.gnu_time_mb) if x is not None]
    if r.wait4_mb > r.parent_rss_mb + 1 or not own:
        own.append(r.wait4_mb)
    return max(own)
