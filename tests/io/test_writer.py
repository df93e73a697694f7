"""The atomic writer: round trips, byte-identical output, sharding, failures leave nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorasurgeon.errors import OutputExistsError, WriteError
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.io.writer import TensorSpec, provenance, save_state_dict, write_safetensors
from tests.conftest import small_state_dict


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_round_trip_read_by_safetensors(tmp_path: Path) -> None:
    sd = small_state_dict()
    out = save_state_dict(tmp_path / "o.safetensors", sd, {"lorasurgeon": {"a": 1}, "plain": "x"})
    got = load_file(out)
    assert sorted(got) == sorted(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k])
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta == {"lorasurgeon": '{"a":1}', "plain": "x"}


def test_byte_identical_wherever_written(tmp_path: Path) -> None:
    sd = small_state_dict()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = tmp_path / "a" / "in.safetensors"
    save_state_dict(src, sd)
    src2 = tmp_path / "b" / "in.safetensors"
    save_state_dict(src2, sd)
    meta1 = {"lorasurgeon": provenance("test", {"rank": 4}, [src])}
    meta2 = {"lorasurgeon": provenance("test", {"rank": 4}, [src2])}
    # Different insertion order must not change the bytes either.
    o1 = save_state_dict(tmp_path / "a" / "o.safetensors", sd, meta1)
    o2 = save_state_dict(tmp_path / "b" / "o.safetensors", dict(reversed(list(sd.items()))), meta2)
    assert o1.read_bytes() == o2.read_bytes()
    rec = json.loads(Checkpoint.open(o1).metadata["lorasurgeon"])
    assert rec["inputs"][0]["name"] == "in.safetensors" and len(rec["inputs"][0]["sha256"]) == 64
    assert str(tmp_path) not in o1.read_bytes()[:4096].decode("utf-8", "ignore")


def test_non_contiguous_and_tied_tensors(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    sd = {"emb.weight": base, "lm_head.weight": base, "t": base.T, "slice": base[::2], "scalar": torch.tensor(2.5)}
    out = save_state_dict(tmp_path / "o.safetensors", sd)
    got = load_file(out)
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_streaming_any_order(tmp_path: Path) -> None:
    sd = small_state_dict()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    order = sorted(sd, key=lambda k: -sd[k].numel())
    out = write_safetensors(tmp_path / "o.safetensors", specs, ((k, sd[k]) for k in order))
    assert out.read_bytes() == save_state_dict(tmp_path / "p.safetensors", sd).read_bytes()


def test_sharded_output(tmp_path: Path) -> None:
    sd = small_state_dict()
    out = save_state_dict(tmp_path / "model", sd, max_shard_bytes=1000)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    with Checkpoint.open(out) as ck:
        for k in sd:
            assert torch.equal(ck.get(k), sd[k])


def test_existing_output_refused_then_forced(tmp_path: Path) -> None:
    p = tmp_path / "o.safetensors"
    p.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="pass --force"):
        save_state_dict(p, small_state_dict())
    assert p.read_bytes() == b"precious"
    save_state_dict(p, small_state_dict(), force=True)
    assert sorted(load_file(p)) == sorted(small_state_dict())
    assert leftovers(tmp_path) == []


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    sd = small_state_dict()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]

    def gen():
        for i, (k, v) in enumerate(sd.items()):
            if i == 2:
                raise RuntimeError("boom")
            yield k, v

    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(tmp_path / "o.safetensors", specs, gen())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(tmp_path / "dir", specs, gen(), max_shard_bytes=100)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_wrong_tensors(tmp_path: Path) -> None:
    sd = small_state_dict()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    with pytest.raises(WriteError, match="never arrived"):
        write_safetensors(tmp_path / "o.safetensors", specs, iter(list(sd.items())[:2]))
    with pytest.raises(WriteError, match="not in the output plan"):
        write_safetensors(tmp_path / "o.safetensors", specs, iter([("zzz", torch.zeros(1))]))
    k = "conv.weight"
    with pytest.raises(WriteError, match="planned"):
        write_safetensors(tmp_path / "o.safetensors", specs, iter([(k, sd[k].float())]))
    assert list(tmp_path.iterdir()) == []


def test_disk_write_failure_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorasurgeon.io.writer as w

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w.os, "pwrite", full)
    with pytest.raises(WriteError, match="No space left on device"):
        save_state_dict(tmp_path / "o.safetensors", small_state_dict())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing(tmp_path: Path, sig: int) -> None:
    code = f"""
import sys, time, torch
from lorasurgeon.io.writer import TensorSpec, write_safetensors
specs = [TensorSpec(f"t{{i}}", torch.float32, (256, 256)) for i in range(50)]
def gen():
    for i in range(50):
        if i == 3:
            print("ready", flush=True)
            time.sleep(30)
        yield f"t{{i}}", torch.zeros(256, 256)
write_safetensors({str(tmp_path / 'o.safetensors')!r}, specs, gen())
"""
    # preexec_fn: a shell starts background jobs with SIGINT ignored and children inherit it
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "ready"
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())
    os.kill(proc.pid, sig)
    proc.wait(timeout=20)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_normal_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        f = save_state_dict(tmp_path / "o.safetensors", small_state_dict())
        d = save_state_dict(tmp_path / "d", small_state_dict(), max_shard_bytes=10_000)
    finally:
        os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o644
    assert d.stat().st_mode & 0o777 == 0o755


def test_worker_threads_leave_signals_to_the_main_thread(tmp_path: Path) -> None:
    """The writer's and the hasher's threads block SIGINT and SIGTERM, so the kernel always hands
    those signals to the main thread, where Python runs its handlers (a signal taken by a worker
    did not interrupt the main thread's sleep: the signal tests above hung under load)."""
    import threading

    from lorasurgeon.io.writer import worker_pool

    def blocked(prefix: str) -> set[int]:
        t = next(t for t in threading.enumerate() if t.name.startswith(prefix))
        status = Path(f"/proc/self/task/{t.native_id}/status").read_text()
        mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        return {s for s in (signal.SIGINT, signal.SIGTERM) if mask >> (s - 1) & 1}

    seen = {}

    def gen():
        yield "a", torch.zeros(4)
        seen["write"] = blocked("lorasurgeon-write")  # the writer thread is alive once a tensor was handed over
        yield "b", torch.zeros(4)

    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    write_safetensors(tmp_path / "o.safetensors", specs, gen())
    assert seen["write"] == {signal.SIGINT, signal.SIGTERM}
    # every other worker (the hashers of HashedInputs / DeferredProvenance) comes from worker_pool:
    # ask from inside one of its threads, so the answer cannot depend on timing
    pool = worker_pool("probe")
    try:
        assert pool.submit(lambda: blocked(threading.current_thread().name)).result() == {signal.SIGINT, signal.SIGTERM}
    finally:
        pool.shutdown()
    assert blocked("MainThread") == set()  # the main thread still takes them


def test_folder_output_dot_replaces_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasurgeon.io.writer import atomic_path

    work = tmp_path / "out"
    work.mkdir()
    (work / "old.txt").write_text("old")
    monkeypatch.chdir(work)
    with atomic_path(".", force=True, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no .tmp- or .old- folder beside it
    assert sorted(os.listdir(work)) == ["new.txt"]


def test_failed_folder_swap_puts_the_old_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasurgeon.io import writer

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.rename

    def rename(src: object, dst: object) -> None:
        if ".tmp-" in str(src):  # moving the new folder in fails
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(writer.os, "rename", rename)
    with pytest.raises(WriteError, match="write failed: No space left on device"):
        with writer.atomic_path(out, force=True, directory=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "old.txt").read_text() == "old"


def test_errors_inside_a_temporary_name_the_output_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a full disk while a folder's file is written: the line names out/model.safetensors, not the
    # deleted .out.tmp-XXXX/model.safetensors by its absolute path
    from lorasurgeon.io.writer import atomic_path

    monkeypatch.chdir(tmp_path)

    def full(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lorasurgeon.io.writer._fsync_file", full)
    with pytest.raises(WriteError) as e, atomic_path("out", directory=True) as tmp:
        save_state_dict(tmp / "model.safetensors", {"a": torch.ones(2)}, {})
    assert e.value.path == str(Path("out") / "model.safetensors") and "No space left on device" in e.value.message
    with pytest.raises(WriteError) as e, atomic_path("one.safetensors") as tmp:
        raise WriteError("write failed: No space left on device", tmp)
    assert e.value.path == "one.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_inputs_recorded_name_does_not_depend_on_how_its_path_is_spelled(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasurgeon.io.writer import input_record

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "x.json").write_text("{}")
    want = input_record(tmp_path / "adapter")
    assert want["name"] == "adapter"
    monkeypatch.chdir(tmp_path / "adapter")
    assert input_record(".") == input_record("../adapter/.") == want
