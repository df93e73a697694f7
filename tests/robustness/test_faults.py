"""Faults while writing: an exception, a full disk, SIGTERM/SIGINT, an existing output, and two
processes racing for one output. The promise (GUIDE §2): outputs appear whole or not at all; a
failure leaves no output and no temporary file, says so in one line, and never touches an
existing output unless --force, which replaces it by an atomic rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorasurgeon.io.writer as writer_mod
from tests.robustness.hostile import Outcome, Valid, check_clean_failure, invoke, listing, temp_leftovers
from tests.robustness.writers import WRITER_BY_ID, WRITERS, Writer, params, snapshot

ROOT = Path(__file__).resolve().parents[2]
# One option set per command in the fast suite (inspect --plot and the data-aware factorize,
# seconds a run, excepted); variants and the training commands in the slow one.
ALL_WRITERS = params(WRITERS, lambda w: w.variant or w.trains or not w.fast_faults)
# Writers that stream safetensors through the writer's pwrite (a fault can hit them half-written);
# inspect --plot (matplotlib) and export (onnx) write their files otherwise, then rename them in.
PWRITE_WRITERS = params([w for w in WRITERS if not (w.id.startswith("export") or w.id == "inspect-plot")],
                        lambda w: w.variant or w.trains or not w.fast_faults)


def _out(tmp_path: Path) -> Path:
    o = tmp_path / "out"
    o.mkdir()
    return o


def _existing(w: Writer, out_dir: Path) -> tuple[Path, dict[str, bytes]]:
    """An output that already exists (a file, or a folder with a file) and its bytes."""
    target = out_dir / w.out_name
    if "." in w.out_name:
        target.write_bytes(b"precious, do not touch")
    else:
        target.mkdir()
        (target / "precious.txt").write_text("do not touch")
    return target, snapshot(out_dir)


# ----------------------------------------------------------------------------- exceptions
class Injected(RuntimeError):
    pass


@pytest.mark.parametrize("writer", PWRITE_WRITERS)
def test_exception_half_way_through_a_write(writer: Writer, valid: Valid, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The second pwrite (the first tensor after the header) raises: the temp file is half-written."""
    real, calls = writer_mod._pwrite_all, []

    def flaky(fd: int, data: memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise Injected("injected fault")
        real(fd, data, offset)

    monkeypatch.setattr(writer_mod, "_pwrite_all", flaky)
    out_dir = _out(tmp_path)
    res = invoke(writer.argv(valid, out_dir / writer.out_name))
    assert len(calls) == 2, "the fault was never reached"
    _check_internal_failure(res, "injected fault", out_dir, resume_state(writer))


def resume_state(w: Writer) -> list[str]:
    """What a training command keeps on purpose after a failure: its --resume state (a complete
    file, written atomically after each finished epoch; deleted once the output is written)."""
    return [f".{w.out_name}.train-state.pt"] if w.trains else []


def _check_internal_failure(res: Outcome, text: str, out_dir: Path, allowed: list[str]) -> None:
    """An unexpected exception: exit 1, one 'internal error' line, nothing left behind."""
    assert res.code == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error") and text in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert [n for n in listing(out_dir) if n not in allowed] == [], listing(out_dir)


@pytest.mark.parametrize("writer", ALL_WRITERS)
def test_exception_before_the_rename_leaves_nothing_and_keeps_the_old_output(
        writer: Writer, valid: Valid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault at the last step before the rename (the fsync of a complete temp file), with --force
    over an existing output: the old output is intact, no temp file remains."""

    def boom(p: Path) -> None:
        raise Injected("injected fault at fsync")

    out_dir = _out(tmp_path)
    target, before = _existing(writer, out_dir)
    monkeypatch.setattr(writer_mod, "_fsync_file", boom)
    res = invoke([*writer.argv(valid, target), "--force"])
    assert res.code == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "injected fault at fsync" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert {k: v for k, v in snapshot(out_dir).items() if k not in resume_state(writer)} == before, "the output changed"
    assert [n for n in temp_leftovers(out_dir) if n not in resume_state(writer)] == [], listing(out_dir)


def test_lorasurgeon_error_half_way_through_a_write(tmp_path: Path) -> None:
    """A real input fault met mid-stream (NaN in the last layer, found after others were written)."""
    sd = {f"layers.{i}.weight": torch.randn(32, 32) for i in range(6)}
    sd["layers.5.weight"][0, 0] = float("nan")
    inp = tmp_path / "late_nan.safetensors"
    save_file(sd, inp)
    out_dir = _out(tmp_path)
    res = invoke(["factorize", str(inp), "-o", str(out_dir / "f.safetensors"), "--rank", "2", "--quiet"])
    check_clean_failure(res, ["late_nan.safetensors"], "NaN", out_dir)


# ----------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("writer", ALL_WRITERS)
def test_disk_full_is_one_clear_line(writer: Writer, valid: Valid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills: every os.pwrite (tensor data) and every fsync (where a full disk or quota
    surfaces for buffered writes, e.g. NFS) fails with ENOSPC."""

    def full(*a: object, **k: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out_dir = _out(tmp_path)
    argv = writer.argv(valid, out_dir / writer.out_name)
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        m.setattr(writer_mod, "_fsync_file", full)
        res = invoke(argv)
    assert res.code == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in lines[0], res.stderr
    assert "internal error" not in lines[0], res.stderr
    assert writer.out_name in lines[0] or str(out_dir) in lines[0], res.stderr
    assert listing(out_dir) == [], listing(out_dir)


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "1m"):  # noqa: ANN201
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("writer_id", ["merge", "densify", "compose-cat"])
def test_really_full_disk(writer_id: str, valid: Valid, tmp_path: Path) -> None:
    """A real 1 MB tmpfs (root only; skipped elsewhere): the write fails for real, nothing remains."""
    w = WRITER_BY_ID[writer_id]
    big = valid
    if writer_id in ("merge", "densify"):
        # an output of ~4 MB: the base with a 1024×1024 embedding (never targeted) beside it
        base = tmp_path / "base.safetensors"
        save_file({**load_file(valid.base), "embed.weight": torch.randn(1024, 1024)}, base)
        big = dataclasses.replace(valid, base=base)
        if writer_id == "densify":
            from lorasurgeon.factorize import factorize_checkpoint
            from lorasurgeon.ops.ranks import RankRule

            fact = tmp_path / "fact.safetensors"
            factorize_checkpoint(base, fact, rule=RankRule("rank", 4.0, None), include=["fc*"], svd_method="exact")
            big = dataclasses.replace(big, fact=fact)
    with tiny_tmpfs(tmp_path / "small", "1m" if writer_id != "compose-cat" else "8k") as small:
        (small / "filler").write_bytes(b"\0" * 4096)
        res = invoke(w.argv(big, small / w.out_name))
        assert res.code == 1, res
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], res.stderr
        assert "internal error" not in lines[0] and "Traceback" not in res.stderr
        assert listing(small) == ["filler"], listing(small)


# ----------------------------------------------------------------------------- existing outputs
@pytest.mark.parametrize("writer", ALL_WRITERS)
def test_existing_output_untouched_without_force_replaced_atomically_with(
        writer: Writer, valid: Valid, tmp_path: Path) -> None:
    out_dir = _out(tmp_path)
    target, before = _existing(writer, out_dir)
    res = invoke(writer.argv(valid, target))
    assert res.code == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "output exists; pass --force" in lines[0] and writer.out_name in lines[0], res.stderr
    assert snapshot(out_dir) == before, "refused, yet the existing output changed"
    assert temp_leftovers(out_dir) == []

    ino = target.stat().st_ino
    res = invoke([*writer.argv(valid, target), "--force"])
    assert res.code == 0, res.stderr
    assert temp_leftovers(out_dir) == []
    after = snapshot(out_dir)
    assert after != before and not any("precious" in k for k in after), "the old output survived --force"
    # A new inode: the output was renamed into place, never rewritten where a reader could see it half-done.
    assert target.stat().st_ino != ino
    # And it is exactly what a fresh run writes.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert invoke(writer.argv(valid, fresh / writer.out_name)).code == 0
    assert snapshot(fresh) == after


# ----------------------------------------------------------------------------- signals
def _big_checkpoint(path: Path, layers: int = 48, dim: int = 512) -> Path:
    if not path.exists():
        g = torch.Generator().manual_seed(0)
        save_file({f"layers.{i:02d}.weight": torch.randn(dim, dim, generator=g) for i in range(layers)}, path)
    return path


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, children inherit that, and Python then
    # keeps ignoring it: restore the default so the SIGINT tests test the program, not the shell.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LORASURGEON_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "lorasurgeon", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, preexec_fn=_default_sigint)


def _wait_for_temp(p: subprocess.Popen, folder: Path, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(".tmp-" in n for n in os.listdir(folder)):
            return
        if p.poll() is not None:
            raise AssertionError(f"finished before its temp file was seen: {p.returncode} {p.stderr.read() if p.stderr else ''}")
        time.sleep(0.005)
    raise AssertionError("no temp file appeared")


def test_sigterm_and_sigint_mid_write_leave_nothing(tmp_path: Path) -> None:
    """factorize of a 48-layer checkpoint (48 MB, exact SVDs: seconds of work) as a real process,
    signalled once its temp file exists. Both signals run at once (2 cores)."""
    inp = _big_checkpoint(tmp_path / "big.safetensors")
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        (tmp_path / sig.name).mkdir()
        out_dir = _out(tmp_path / sig.name)
        procs[sig] = (_spawn(["factorize", str(inp), "-o", str(out_dir / "f.safetensors"), "--rank", "4", "--svd", "exact",
                              "--quiet"]), out_dir)
    for sig, (p, out_dir) in procs.items():
        _wait_for_temp(p, out_dir)
        time.sleep(0.2)
        assert p.poll() is None, "finished before the signal: make the job longer"
        p.send_signal(sig)
    for sig, (p, out_dir) in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 128 + sig, (sig, p.returncode, err)
        assert "Traceback" not in err, err
        assert listing(out_dir) == [], (sig, listing(out_dir))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("target", ["folder-output", "sharded-input"])
def test_signals_on_other_shapes_of_output(sig: int, target: str, tmp_path: Path) -> None:
    """The same with a model-folder output (atomic temp folder) from a sharded folder input."""
    from lorasurgeon.io.writer import save_state_dict

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "model"
    save_state_dict(src, {f"layers.{i:02d}.weight": torch.randn(512, 512, generator=g) for i in range(48)},
                    max_shard_bytes=8 << 20)
    (src / "config.json").write_text("{}")
    out_dir = _out(tmp_path)
    p = _spawn(["factorize", str(src), "-o", str(out_dir / "m"), "--rank", "4", "--svd", "exact", "--quiet"])
    _wait_for_temp(p, out_dir)
    time.sleep(0.2)
    assert p.poll() is None
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig and "Traceback" not in err, (p.returncode, err)
    assert listing(out_dir) == []


# ----------------------------------------------------------------------------- concurrency
def _race(inp: Path, out: Path, ranks: tuple[int, int], force: bool) -> list[subprocess.CompletedProcess]:
    procs = [_spawn(["factorize", str(inp), "-o", str(out), "--rank", str(r), "--svd", "exact", "--quiet",
                     *(["--force"] if force else [])]) for r in ranks]
    done = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return done


def _expected(inp: Path, ranks: tuple[int, int], where: Path) -> list[bytes]:
    """Each racer's output written alone, in-process with one thread like the racers (LAPACK's
    results depend on the thread count: see docs/reliability.md)."""
    exp, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in ranks:
            d = where / f"rank{r}"
            d.mkdir(parents=True)
            res = invoke(["factorize", str(inp), "-o", str(d / "f.safetensors"), "--rank", str(r), "--svd", "exact",
                          "--quiet"])
            assert res.code == 0, res.stderr
            exp.append((d / "f.safetensors").read_bytes())
    finally:
        torch.set_num_threads(threads)
    return exp


@pytest.mark.parametrize("force", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["force", "no-force"])
def test_two_processes_one_output_never_a_mix(force: bool, tmp_path: Path) -> None:
    """Two factorize processes with different ranks write the same path at once: the result is
    exactly one of the two complete outputs (with --force both succeed, the last rename wins;
    without it, at least one succeeds and a loser says the output exists)."""
    inp = _big_checkpoint(tmp_path / "big.safetensors", layers=16, dim=256)
    ranks = (3, 5)
    expected = _expected(inp, ranks, tmp_path / "expected")
    out_dir = _out(tmp_path)
    out = out_dir / "f.safetensors"
    results = _race(inp, out, ranks, force)
    codes = [r.returncode for r in results]
    if force:
        assert codes == [0, 0], [r.stderr for r in results]
    else:
        assert 0 in codes and set(codes) <= {0, 1}, [r.stderr for r in results]
        for r in results:
            if r.returncode == 1:
                lines = r.stderr.splitlines()
                assert len(lines) == 1 and "output exists; pass --force" in lines[0], r.stderr
    assert out.read_bytes() in expected, "the output is not one of the two complete files"
    assert listing(out_dir) == ["f.safetensors"], listing(out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(4))
def test_race_rounds(round_: int, tmp_path: Path) -> None:
    """More rounds of the --force race, with the second process started at staggered delays."""
    inp = _big_checkpoint(tmp_path / "big.safetensors", layers=16, dim=256)
    ranks = (2, 7)
    expected = _expected(inp, ranks, tmp_path / "expected")
    out_dir = _out(tmp_path)
    out = out_dir / "f.safetensors"
    first = _spawn(["factorize", str(inp), "-o", str(out), "--rank", "2", "--svd", "exact", "--quiet", "--force"])
    time.sleep(0.3 * round_)
    second = _spawn(["factorize", str(inp), "-o", str(out), "--rank", "7", "--svd", "exact", "--quiet", "--force"])
    for p in (first, second):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert out.read_bytes() in expected
    assert listing(out_dir) == ["f.safetensors"]


def test_export_failure_at_the_last_rename_leaves_nothing(valid: Valid, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = writer_mod._fsync_file

    def fail_on_onnx(p: Path) -> None:
        if ".e.onnx.tmp-" in p.name:
            raise Injected("fault at the .onnx commit")
        real(p)

    monkeypatch.setattr(writer_mod, "_fsync_file", fail_on_onnx)
    out_dir = _out(tmp_path)
    res = invoke(WRITER_BY_ID["export-separate-adapters"].argv(valid, out_dir / "e.onnx"))
    assert res.code == 1
    assert listing(out_dir) == [], listing(out_dir)


def test_sigterm_while_the_temp_registry_is_locked_does_not_deadlock() -> None:
    """The SIGTERM handler takes the lock of the live-temporaries registry; the signal can arrive
    while the main thread holds it (registering a temporary). A plain Lock hung there forever."""
    code = ("import os, signal, sys\n"
            "from lorasurgeon.io import writer\n"
            "writer.install_cli_sigterm()\n"
            "try:\n"
            "    with writer._live_lock:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        sum(range(100000))\n"
            "except SystemExit as e:\n"
            "    print('exit', e.code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "exit 143", out.stderr
