"""The one atomic writer.

Every output goes to a temporary sibling (same folder, so the final ``rename`` is atomic),
is fsynced, then renamed over the target. An existing target is refused unless ``force``.
A failure or signal at any point removes the temporary file: never a half-written output.

Safetensors files are written from a list of specs (name, dtype, shape) known up front; the
header is laid out first and each tensor is written at its offset as it arrives, so a caller
streams one tensor at a time and never holds the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon._finite import json_safe
from lorasurgeon._version import __version__
from lorasurgeon.errors import (
    InputNotFoundError,
    InvalidOptionError,
    LorasurgeonError,
    OutputExistsError,
    WriteError,
)
from lorasurgeon.io.checkpoint import PICKLE_SUFFIXES, Checkpoint, dtype_name, require_regular_file

METADATA_KEY = "lorasurgeon"
FORMAT_VERSION = 1

_live_temps: set[Path] = set()
# Re-entrant: the SIGTERM handler runs in the main thread between two bytecodes, possibly while
# that thread holds the lock (registering a temporary); a plain Lock would deadlock there (seen
# once under load: a SIGTERM'd factorize that never exited).
_live_lock = threading.RLock()


def _cleanup_temps() -> None:
    with _live_lock:
        for p in list(_live_temps):
            with contextlib.suppress(OSError):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
        _live_temps.clear()


def _on_term(signum: int, frame: Any) -> None:
    _cleanup_temps()
    raise SystemExit(128 + signum)  # the default action (exit), after the clean-up; finally blocks run


def install_cli_sigterm() -> None:
    """The CLI, for the whole process: SIGTERM removes live temporaries and exits 143 (silently,
    like SIGINT's 130). Only over the default action, and from the main thread."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_term)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While a library call writes: SIGTERM at its default action removes live temporaries and
    raises SystemExit(143), so ``finally`` blocks run; the default is restored afterwards. An
    ignored SIGTERM, a caller's own handler, or a worker thread: nothing changes."""
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _on_term)
    try:
        yield
    finally:
        if ours and signal.getsignal(signal.SIGTERM) is _on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _given_text(path: str | Path) -> str | None:
    """The output as the user typed it, where known: a str as is, and the CLI's ``-o``
    (``cli.options.OutputPath``, whose ``given`` is the text typed). pathlib drops a trailing
    "/" and reads "" as "."; the text keeps both."""
    return path if isinstance(path, str) else getattr(path, "given", None)


def check_output(path: str | Path, force: bool, inputs: Sequence[str | Path | None] = (),
                 data: str | Path | None = None, *, pickle_name_ok: bool = False,
                 directory: bool | None = None) -> Path:
    """Refuse an existing output unless ``force``; the parent folder must exist and be writable,
    and the name must not be one every reader, ours included, takes for a pickle
    (``io.checkpoint.PICKLE_SUFFIXES``: we write safetensors) unless
    ``pickle_name_ok`` (train's own resume state, written with torch.save).

    ``directory``: what the command will write there, when the caller knows (a folder: True; one
    file: False). A file output given as a folder ("out/", or an existing folder) is refused now,
    not after the work: pathlib would drop the slash and the write would fail or name a file "out".

    ``inputs``: the command's input paths (None entries skipped); a missing one is reported
    first, before anything about the output. Replacing a folder deletes what it holds, so an
    existing output folder that holds one of them, or ``data`` (a dataset path, or a named set
    that is not a path), is refused even with ``force`` (``-o .`` beside the inputs); so is an
    output inside an input folder (``-o model/model.safetensors``), which would change that
    input, and the output being an input itself (GUIDE §2: an input is never modified; a
    training set overwritten by model weights was the case that showed it).
    """
    for i in inputs:
        if i is not None and not Path(i).exists():
            raise InputNotFoundError("no such file or folder", i)
    given = _given_text(path)
    if given == "":  # an unset shell variable (-o "$OUT"): "." to pathlib, which --force would replace
        raise InvalidOptionError("the output path is empty")
    p = Path(path)
    if directory is False:
        folder = given if given is not None and given.endswith(("/", os.sep)) else None
        if folder is not None or p.is_dir():
            raise InvalidOptionError("a folder, but this command writes one file here: give the file's name",
                                     folder if folder is not None else p)
    if p.suffix.lower() in PICKLE_SUFFIXES and not pickle_name_ok:
        raise InvalidOptionError(f"lorasurgeon never writes PyTorch pickles, and later steps read {p.suffix} files as "
                                 "pickles: name the output .safetensors (.onnx for export), or a folder", p)
    if p.exists() and not force:
        raise OutputExistsError("output exists; pass --force to replace it", p)
    if not p.parent.exists():
        raise WriteError("output folder does not exist", p.parent)
    if not os.access(os.path.dirname(os.path.abspath(p)), os.W_OK | os.X_OK):  # before hours of work, not after
        raise WriteError("output folder is not writable", p.parent)
    real_out = os.path.realpath(p)
    out_is_dir = p.is_dir()
    for i in [*inputs, data]:
        if i is None or not Path(i).exists():  # a named set ("digits"), an absent option
            continue
        real = os.path.realpath(i)
        if real == real_out:
            raise InvalidOptionError(f"the output is the input {Path(i).name!r}; inputs are never modified: choose "
                                     "another output", p)
        if Path(i).is_dir() and os.path.commonpath([real, real_out]) == real:
            raise InvalidOptionError(f"the output lies inside the input folder {Path(i).name!r}; writing there would "
                                     "change that input: choose another output", p)
        if out_is_dir and os.path.commonpath([real_out, real]) == real_out:
            raise InvalidOptionError(f"the output folder holds the input {Path(i).name!r}; replacing the folder "
                                     "would delete it: choose another output", p)
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path, force: bool = False, directory: bool = False, *,
                pickle_name_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place.

    Args:
        path: the final output (a file, or a folder when ``directory``).
        force: replace an existing output.
        directory: the output is a folder; the temporary is a folder filled by the caller.
        pickle_name_ok: allow a ``.pt`` name (see ``check_output``).

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.
        WriteError: the write or the rename failed (disk full, permissions).
    """
    shown = check_output(path, force, pickle_name_ok=pickle_name_ok,  # errors name the output as the user gave it
                         directory=directory)
    with sigterm_exits(), _atomic_path(shown, force, directory) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_path(shown: Path, force: bool, directory: bool) -> Iterator[Path]:
    # The mechanics work on the absolute path: "-o ." has no name and is its own parent.
    final = Path(os.path.abspath(shown))
    parent = final.parent
    prefix = f".{final.name}.tmp-"
    try:
        umask = os.umask(0)
        os.umask(umask)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual permissions
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise WriteError(f"cannot create a temporary file: {e.strerror or e}", parent) from e
    with _live_lock:
        _live_temps.add(tmp)
    try:
        try:
            yield tmp
        except LorasurgeonError as e:  # a file inside the temporary: name it under the output, as given
            if e.path is not None:
                inner = Path(os.path.abspath(e.path))
                if inner == tmp:
                    e.path = str(shown)
                elif directory and tmp in inner.parents:
                    e.path = str(shown / inner.relative_to(tmp))
            raise
        if directory:
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    _fsync_file(f)
        else:
            _fsync_file(tmp)
        if final.exists() and not force:  # appeared while we worked
            raise OutputExistsError("output exists; pass --force to replace it", shown)
        if directory and final.exists():
            _swap_folder(tmp, final)
        else:
            os.replace(tmp, final)
        _fsync_dir(parent)
    except OSError as e:
        raise WriteError(f"write failed: {e.strerror or e}", shown) from e
    finally:
        with _live_lock:
            _live_temps.discard(tmp)
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _swap_folder(tmp: Path, final: Path) -> None:
    """Put the folder ``tmp`` in place of the existing ``final`` (``--force`` replaces the whole
    output, as a fresh run would write it): move the old one aside, move the new one in, delete
    the old. If the second move fails the old folder goes back, and nothing is left beside it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    old = trash / "old"
    try:
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)
            raise
    finally:
        if old.exists():
            if not final.exists():  # both moves back failed: keep the old output, say where
                raise WriteError(f"the old output was moved to {old} and could not be moved back", final)
            shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            trash.rmdir()


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_files(moves: Sequence[tuple[Path, Path]]) -> None:
    """Move staged files to their final paths as one unit: all of them, or none.

    Each move is atomic on its own (``atomic_path``: fsync, rename). Files the moves would replace
    (``force``, checked by the caller) are first renamed aside; if any move fails, the moves already made are undone,
    the replaced files are put back, and the error propagates. On success the old files are deleted.
    """
    backups: list[tuple[Path, Path]] = []
    done: list[Path] = []
    try:
        for _, dst in moves:
            if dst.exists():
                bak = dst.with_name(f".{dst.name}.bak-{os.getpid()}")
                os.replace(dst, bak)
                backups.append((bak, dst))
        for src, dst in moves:
            with atomic_path(dst, True) as tmp:
                os.replace(src, tmp)
            done.append(dst)
    except BaseException:
        for dst in done:
            dst.unlink(missing_ok=True)
        for bak, dst in backups:
            os.replace(bak, dst)
        raise
    for bak, _ in backups:
        bak.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, force: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n", force)


# --------------------------------------------------------------------------- provenance
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks (no mmap: pages do not stay resident)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)  # one reused buffer: a fresh bytes object per chunk costs page faults
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _input_name(p: Path) -> str:
    """An input's basename however its path was spelled (``.``, ``sub/..``); a symlink keeps its
    own name (a hub cache's links name files, their blobs do not)."""
    return Path(os.path.abspath(p)).name


def input_record(path: str | Path) -> dict[str, Any]:
    """Basename and sha256 of an input: a file, or a folder's files in sorted order.

    Raises:
        FormatError: a FIFO, device or socket (hashing would block on it, or consume it).
    """
    p = Path(path)
    if p.is_dir():
        files = {str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"name": _input_name(p), "sha256": digest, "files": len(files)}
    require_regular_file(p)
    return {"name": _input_name(p), "sha256": sha256_file(p)}


class HashedInputs:
    """Input records (name, sha256) computed on a background thread from construction on.

    A command starts one as soon as its inputs are known and passes it to ``provenance`` when it
    writes: the hashing overlaps the command's own work instead of adding to it.
    """

    def __init__(self, inputs: Iterable[str | Path]) -> None:
        self.paths = list(inputs)
        self._pool = worker_pool("hash")
        self._future = self._pool.submit(lambda: [input_record(p) for p in self.paths])
        self._pool.shutdown(wait=False)

    def records(self) -> list[dict[str, Any]]:
        return self._future.result()


def provenance(
    command: str, options: dict[str, Any], inputs: Iterable[str | Path] | HashedInputs,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON stored under the ``lorasurgeon`` metadata key: deterministic, no paths or times."""
    rec: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "tool": "lorasurgeon",
        "tool_version": __version__,
        "command": command,
        "options": options,
        "inputs": inputs.records() if isinstance(inputs, HashedInputs) else [input_record(p) for p in inputs],
    }
    if extra:
        rec.update(extra)
    return rec


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata maps strings to strings; JSON-encode everything else, sorted."""
    out: dict[str, str] = {}
    for k, v in meta.items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(json_safe(v), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return out


_PLACEHOLDER_SHA = "0" * 64


def _block_signals_in_worker() -> None:
    """ThreadPoolExecutor initializer: this worker thread never receives SIGINT or SIGTERM.

    The kernel hands a process signal to any thread that does not block it. Python runs its
    handlers in the main thread only, and a signal taken by a worker does not interrupt a
    blocking call the main thread is in (a sleep, a wait): the handler would run only when that
    call returns. Blocked here, the signals always reach the main thread.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def worker_pool(name: str) -> Any:
    """A one-thread executor whose thread leaves SIGINT and SIGTERM to the main thread."""
    import concurrent.futures

    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lorasurgeon-{name}",
                                                 initializer=_block_signals_in_worker)


class DeferredProvenance:
    """Provenance whose input hashes are computed in a background thread while the output streams.

    Hashing a multi-GB input costs about as much as reading it (measured 1.56 s for a 2 GB base
    on this CPU), and the header, which holds the hashes, comes first in the file. ``placeholder``
    is the record with every sha256 replaced by 64 zeros; ``result()`` waits for the thread and
    gives the real one. A hex digest always has 64 characters, so both encode to headers of the
    same length: the writer plans offsets with the placeholder and rewrites the header in place
    at the end (``write_safetensors(..., final_metadata=...)``). hashlib releases the GIL on
    large updates, so the hash runs alongside the tensor work.
    """

    def __init__(
        self, command: str, options: dict[str, Any], inputs: Iterable[str | Path], extra: dict[str, Any] | None = None
    ) -> None:
        paths = list(inputs)
        self.placeholder = provenance(command, options, [], extra)
        self.placeholder["inputs"] = [_placeholder_record(p) for p in paths]
        self._hashes = HashedInputs(paths)

    def result(self) -> dict[str, Any]:
        rec = dict(self.placeholder)
        rec["inputs"] = self._hashes.records()
        return rec


def _placeholder_record(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        return {"name": _input_name(p), "sha256": _PLACEHOLDER_SHA, "files": sum(1 for f in p.rglob("*") if f.is_file())}
    require_regular_file(p)  # (before the hashing thread would block on a FIFO)
    return {"name": _input_name(p), "sha256": _PLACEHOLDER_SHA}


# --------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Build a safetensors header. Tensors are laid out in name order (deterministic)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offsets: dict[str, int] = {}
    pos = 0
    for s in sorted(specs, key=lambda s: s.name):
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw, offsets


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _StFile:
    """One safetensors file being written at known offsets."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
        self.path = path
        self.specs = {s.name: s for s in specs}
        head, self.offsets = _header_bytes(specs, metadata)
        self.spec_list = specs
        self.data_start = len(head)
        self.remaining = set(self.specs)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        total = self.data_start + sum(s.nbytes for s in specs)
        _pwrite_all(self.fd, memoryview(head), 0)
        os.ftruncate(self.fd, total)

    def write(self, name: str, t: torch.Tensor) -> None:
        s = self.specs[name]
        if tuple(t.shape) != s.shape or t.dtype != s.dtype:
            raise WriteError(
                f"tensor {name!r} is {tuple(t.shape)} {t.dtype}, planned {s.shape} {s.dtype}", self.path
            )
        _pwrite_all(self.fd, _tensor_bytes(t), self.data_start + self.offsets[name])
        self.remaining.discard(name)

    def rewrite_header(self, metadata: dict[str, str]) -> None:
        """Replace the header with one built from final metadata of the same encoded length."""
        head, offsets = _header_bytes(self.spec_list, metadata)
        if len(head) != self.data_start or offsets != self.offsets:
            raise WriteError("the final metadata does not fit the planned header", self.path)
        _pwrite_all(self.fd, memoryview(head), 0)

    def close(self) -> None:
        os.close(self.fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _shard_plan(specs: list[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    ordered = sorted(specs, key=lambda s: s.name)
    if not max_shard_bytes:
        return [ordered]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in ordered:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_safetensors(
    path: str | Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, Any] | None = None,
    *,
    force: bool = False,
    max_shard_bytes: int | None = None,
    weights_name: str = "model.safetensors",
    on_tensor: Callable[[str], None] | None = None,
    final_metadata: Callable[[], dict[str, Any]] | None = None,
) -> Path:
    """Write tensors to a safetensors file atomically, streaming one tensor at a time.

    Args:
        path: a ``.safetensors`` file; or, with ``max_shard_bytes``, a folder that receives
            ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``.
        specs: every tensor's name, dtype and shape, known before any data.
        tensors: ``(name, tensor)`` pairs in any order, each name once; tensors may be
            views, non-contiguous, or share storage (tied weights are written as copies).
        metadata: string values stored as is, others JSON-encoded with sorted keys.
        force: replace an existing output.
        max_shard_bytes: shard when given.
        weights_name: file name stem for shards (``model.safetensors`` -> ``model-...``).
        on_tensor: called with each name once it is written (progress).
        final_metadata: called once every tensor is written; its result replaces ``metadata``
            in the header, which must keep the same encoded length (``DeferredProvenance``).

    Returns:
        The output path.

    Raises:
        OutputExistsError, WriteError. Nothing is left behind on failure.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise WriteError("duplicate tensor names in the output plan", path)
    meta = encode_metadata(metadata or {})
    shards = _shard_plan(specs, max_shard_bytes)
    if max_shard_bytes is None:
        with atomic_path(path, force) as tmp:
            _write_stream(tmp, [(tmp, specs, meta)], tensors, on_tensor, final_metadata)
        return Path(path)
    n = len(shards)
    stem = weights_name[: -len(".safetensors")] if weights_name.endswith(".safetensors") else weights_name
    with atomic_path(path, force, directory=True) as tmpdir:
        files = []
        weight_map: dict[str, str] = {}
        for i, sh in enumerate(shards, 1):
            fname = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
            files.append((tmpdir / fname, sh, meta))
            for s in sh:
                weight_map[s.name] = fname
        _write_stream(tmpdir, files, tensors, on_tensor, final_metadata)
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmpdir / f"{weights_name}.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return Path(path)


def _write_stream(
    where: Path,
    files: list[tuple[Path, list[TensorSpec], dict[str, str]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    on_tensor: Callable[[str], None] | None,
    final_metadata: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Write each tensor at its planned offset. One write is in flight on a background thread
    while the next tensor is produced (``pwrite`` releases the GIL), so producing and writing
    overlap; at most one finished tensor waits, which bounds the extra memory to one tensor.

    Guarantee to producers (``merge`` relies on it to reuse two output buffers): when the
    writer asks for the next tensor, every tensor but the last one it was given is completely
    written, and it no longer holds a reference to them.
    """
    import concurrent.futures

    open_files: list[_StFile] = []
    owner: dict[str, _StFile] = {}
    pool = worker_pool("write")
    pending: tuple[str, concurrent.futures.Future[None]] | None = None

    def settle() -> None:
        nonlocal pending
        if pending is not None:
            name, fut = pending
            pending = None
            fut.result()
            if on_tensor:
                on_tensor(name)

    try:
        for fpath, sh, meta in files:
            f = _StFile(fpath, sh, meta)
            open_files.append(f)
            for s in sh:
                owner[s.name] = f
        for name, t in tensors:
            if name not in owner:
                raise WriteError(f"tensor {name!r} is not in the output plan", where)
            if name not in owner[name].remaining:
                raise WriteError(f"tensor {name!r} written twice", where)
            owner[name].remaining.discard(name)
            settle()
            pending = (name, pool.submit(owner[name].write, name, t))
        settle()
        missing = sorted(n for f in open_files for n in f.remaining)
        if missing:
            raise WriteError(f"{len(missing)} planned tensor(s) never arrived, e.g. {missing[0]!r}", where)
        if final_metadata is not None:
            final = encode_metadata(final_metadata())
            for f in open_files:
                f.rewrite_header(final)
    finally:
        if pending is not None:  # an error elsewhere: let the write finish before closing its file
            concurrent.futures.wait([pending[1]])
        pool.shutdown(wait=True)
        for f in open_files:
            f.close()


def save_state_dict(
    path: str | Path,
    state: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    *,
    force: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write an in-memory state dict (small outputs: adapters, tests) through the same writer."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    return write_safetensors(
        path, specs, iter(state.items()), metadata, force=force, max_shard_bytes=max_shard_bytes
    )


# Weights of the input model in another form (pytorch_model.bin beside model.safetensors, ONNX or
# OpenVINO exports, TF/Flax/GGUF copies): copied into the output folder they would still describe
# the input model, and a loader that prefers them (from_pretrained(use_safetensors=False),
# onnxruntime) would run the old weights. Sentence-transformers' own module folders (2_Dense/...)
# hold other modules' weights and are kept.
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf",
                    ".ot", ".mlmodel")


def _stale_weights(rel: Path) -> bool:
    if len(rel.parts) > 1 and re.match(r"\d+_", rel.parts[0]):
        return False
    return rel.name.endswith(_WEIGHT_SUFFIXES) or (len(rel.parts) > 1 and rel.parts[0] in ("onnx", "openvino", "coreml"))


def require_output(out: str | Path | None, dry_run: bool) -> None:
    """A command that writes needs its output path unless --dry-run (compose, resize and extract
    also run in memory as library calls, with none: their commands call this themselves)."""
    if out is None and not dry_run:
        raise InvalidOptionError("an output path (-o) is needed unless --dry-run")


def check_folder_name(out: str | Path | None) -> None:
    """A model folder in gives a model folder out: an output named like a file is refused (checked
    once the input is known to be a model, so that what is wrong with the input is said first)."""
    if out is not None and Path(out).suffix.lower() == ".safetensors":
        raise InvalidOptionError("a model folder in gives a model folder out, but the output's name ends .safetensors: "
                                 "give a folder name", out)


def write_like_input(
    ck: Checkpoint, inp: Path, out: Path, specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]], meta: dict[str, Any], force: bool,
    final_metadata: Callable[[], dict[str, Any]] | None = None,
    replace_files: dict[str, str] | None = None,
) -> None:
    """A file in gives a file out; a model folder in gives a model folder out (other files copied,
    except those named in ``replace_files``, written with the text given there instead, and the
    input's weights in other forms, ``_stale_weights``)."""
    if not inp.is_dir():
        write_safetensors(out, specs, tensors, meta, force=force, final_metadata=final_metadata)
        return
    weights = {f.resolve() for f in ck.files}
    if ck.weights_file is not None:
        weights.add(ck.weights_file.resolve())
    with atomic_path(out, force, directory=True) as tmp:
        for f in sorted(inp.rglob("*")):
            rel = f.relative_to(inp)
            if f.resolve() in weights or f.name.endswith(".index.json") or any(p.startswith(".") for p in rel.parts):
                continue
            if f.is_file() and _stale_weights(rel):
                continue
            if f.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            elif f.is_file() and str(rel) not in (replace_files or {}):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / rel)
        for rel_name, text in (replace_files or {}).items():
            (tmp / rel_name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel_name).write_text(text, encoding="utf-8")
        write_safetensors(tmp / "model.safetensors", specs, tensors, meta, final_metadata=final_metadata)
