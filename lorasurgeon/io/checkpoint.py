"""The one lazy checkpoint reader.

``Checkpoint.open(path)`` accepts a ``.safetensors`` file, a sharded folder or its
``*.index.json``, a ``.pt/.bin/.pth`` state dict, or a Hugging Face model folder (config.json
beside the weights). It lists names, shapes, dtypes and byte sizes without reading tensor data
and returns one tensor at a time.

Memory: safetensors data is read with ``os.pread`` into a fresh buffer, never memory-mapped,
so a tensor's file pages never count towards the process's resident set. ``.pt`` files are
opened with ``torch.load(weights_only=True, mmap=True)``; the mapping is dropped and reopened
once the pages touched since opening pass a small budget, so resident memory stays bounded.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import stat
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon.errors import FormatError, InputNotFoundError, UnsafeFileError

# safetensors dtype names <-> torch dtypes.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

# The safetensors library refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Files inside a model folder that hold weights, in order of preference.
_FOLDER_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "adapter_model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "adapter_model.bin",
)
_PT_REOPEN_BYTES = 128 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``F32``, ``BF16``...)."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_size(name: str) -> int:
    return torch.empty((), dtype=ST_DTYPES[name]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    nbytes: int
    file: str  # basename of the file holding it

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _StEntry:
    path: Path
    begin: int  # absolute offset in the file
    nbytes: int


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def require_regular_file(path: Path) -> None:
    """A checkpoint is read at offsets, more than once: a FIFO, device or socket would block or
    read differently each time.

    Raises:
        FormatError: ``path`` is not a regular file (symlinks to one are fine).
    """
    what = _not_a_file(path)
    if what:
        raise FormatError(f"is {what}, not a checkpoint file: save the weights to a file first", path)


def _not_a_file(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file ("a FIFO (named pipe)", ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path) from e
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:  # json.loads would keep the last silently; the safetensors library refuses the file
            raise FormatError(f"corrupt safetensors header: {_q(k)} appears twice")
        seen[k] = v
    return seen


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, _StEntry], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data, at least as strictly
    as the safetensors library does: every name once (a key twice is refused even where both
    copies agree), ``__metadata__`` a map of strings, and the tensors' bytes exactly tiling the
    data section (no overlap, gap or trailing bytes).

    Raises:
        FormatError: the header's length, JSON, dtypes, shapes or offsets do not fit the file.
    """
    require_regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"not a safetensors file: {size} bytes, shorter than the 8-byte header length", path
                )
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES:
                raise FormatError(
                    f"safetensors header claims {hlen} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt or not safetensors",
                    path,
                )
            if 8 + hlen > size:
                raise FormatError(
                    f"truncated or corrupt safetensors file: header claims {hlen} bytes but the file has {size - 8} after the length",
                    path,
                )
            raw = f.read(hlen)
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path) from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"corrupt safetensors header: not valid UTF-8 JSON ({e})", path) from None
    except FormatError as e:
        raise FormatError(e.message, path) from None
    if not isinstance(header, dict):
        raise FormatError("corrupt safetensors header: not a JSON object", path)
    meta_raw = header.pop("__metadata__", None)
    meta_raw = {} if meta_raw is None else meta_raw
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise FormatError("corrupt safetensors header: __metadata__ must map strings to strings", path)
    # JSON escapes can smuggle lone surrogates (\udcff) that no UTF-8 writer or terminal accepts;
    # the safetensors library refuses them too.
    for text in (*header, *meta_raw, *meta_raw.values()):
        if not is_utf8(text):
            raise FormatError(f"corrupt safetensors header: {text!r:.80} is not valid UTF-8 (a lone surrogate escape)", path)
    data_start = 8 + hlen
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    entries: dict[str, _StEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise FormatError(f"corrupt safetensors header: entry {_q(name)} is not an object", path)
        dt = spec.get("dtype")
        shape = spec.get("shape")
        offs = spec.get("data_offsets")
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise FormatError(f"tensor {_q(name)} has unknown dtype {dt!r:.40}", path)
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)
        ):
            raise FormatError(f"tensor {_q(name)} has an invalid shape {shape!r:.80}", path)
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise FormatError(f"tensor {_q(name)} has invalid data_offsets {offs!r:.80}", path)
        b, e = offs
        if not (0 <= b <= e <= data_len):
            raise FormatError(
                f"tensor {_q(name)} offsets [{b}, {e}] lie outside the {data_len}-byte data section (truncated or corrupt file)",
                path,
            )
        nbytes = _numel(tuple(shape)) * dtype_size(dt)
        if e - b != nbytes:
            raise FormatError(
                f"tensor {_q(name)}: shape {shape} of {dt} needs {nbytes} bytes but its offsets span {e - b}",
                path,
            )
        infos[name] = TensorInfo(name, tuple(shape), dt, nbytes, path.name)
        entries[name] = _StEntry(path, data_start + b, nbytes)
        spans.append((b, e, name))
    spans.sort()
    end, last = 0, None
    for b, e, name in spans:
        if b < end:
            raise FormatError(f"tensors {_q(last or '')} and {_q(name)} overlap in the data section", path)
        if b > end:
            raise FormatError(f"corrupt safetensors file: {b - end} unused bytes before tensor {_q(name)} (the "
                              "safetensors library refuses gaps in the data section)", path)
        end, last = e, name
    if end != data_len:
        raise FormatError(f"corrupt safetensors file: {data_len - end} bytes after the last tensor's data (the "
                          "safetensors library refuses them)", path)
    return infos, entries, dict(meta_raw)


def _q(name: str, limit: int = 80) -> str:
    """A tensor name quoted for a one-line message, shortened when a header makes it huge."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def is_utf8(text: str) -> bool:
    """Whether a string (a file name surrogate-escaped where its bytes were not UTF-8) encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (u64, little-endian) and then ``{``."""
    try:
        if not path.is_file():  # a FIFO would block the read
            return False
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8 and head[8:9] == b"{"


def _read_exact(path: Path, offset: int, nbytes: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """``nbytes`` bytes at ``offset`` as a uint8 tensor, read with ``preadv``.

    The buffer is ``into[:nbytes]`` when given (a caller's reused buffer: no page faults), else
    uninitialised new memory (``torch.empty``): a zero-filled ``bytearray`` costs a pass over
    fresh pages before the read fills them again (measured as most of the read time of a 2 GB
    merge).
    """
    buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
    if nbytes == 0:
        return buf
    view = memoryview(buf.numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise FormatError(f"unexpected end of file reading {nbytes} bytes at offset {offset}", path)
            done += n
    finally:
        os.close(fd)
    return buf


def _safe_join(folder: Path, rel: str, index: Path) -> Path:
    """Resolve a shard name from an index, refusing anything outside the folder."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\x00" in rel:
        raise UnsafeFileError(f"shard index names {rel!r}, which is not a file inside its folder", index)
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:  # a lone surrogate JSON can hold and no file name can
        raise UnsafeFileError(f"shard index names {rel!r}, which is not a file name", index) from None
    target = (folder / rel).resolve()
    root = folder.resolve()
    if root not in target.parents:
        raise UnsafeFileError(f"shard index points outside its folder: {rel!r}", index)
    return target


def _is_zip_pickle(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def named_adapter_subfolders(folder: Path) -> list[str]:
    """Subfolders holding an adapter_config.json (PEFT's layout for adapters not called "default")."""
    try:
        return sorted(d.name for d in folder.iterdir() if (d / "adapter_config.json").is_file())
    except OSError:
        return []


class Checkpoint:
    """A lazy, read-only view of the tensors in a checkpoint.

    Use ``Checkpoint.open(path)``; iterate ``names()``; ``info(name)`` for shape/dtype/bytes;
    ``get(name)`` returns a new tensor that the caller owns.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        infos: dict[str, TensorInfo],
        metadata: dict[str, str],
        files: list[Path],
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind  # "safetensors" | "sharded-safetensors" | "pickle" | "sharded-pickle"
        self._infos = infos
        self.metadata = metadata
        self.files = files
        self.config = config  # config.json of a model folder
        self._st: dict[str, _StEntry] = {}
        self._pt_files: dict[str, Path] = {}
        self._pt_cache: dict[Path, tuple[dict[str, torch.Tensor], int]] = {}
        self.weights_file: Path | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open any supported checkpoint lazily.

        Raises:
            InputNotFoundError: the path does not exist.
            FormatError: unknown extension, no weights in a folder, or a corrupt file.
            UnsafeFileError: a pickle that needs code to load, or a shard outside its folder.
        """
        p = Path(path)
        if not p.exists():
            raise InputNotFoundError("no such file or folder", p)
        if p.is_dir():
            return cls._open_folder(p)
        require_regular_file(p)
        name = p.name.lower()
        if name.endswith(".index.json"):
            return cls._open_index(p)
        if name.endswith(".safetensors"):
            return cls._open_safetensors(p)
        if name.endswith(PICKLE_SUFFIXES):
            return cls._open_pickles(p, [p])
        if _looks_like_safetensors(p):  # e.g. an output written as "-o merged" with no extension
            return cls._open_safetensors(p)
        raise FormatError(
            "unknown checkpoint extension; expected .safetensors, .pt, .pth, .bin, .ckpt, "
            "a *.index.json or a model folder",
            p,
        )

    @classmethod
    def _open_folder(cls, folder: Path) -> Checkpoint:
        config = None
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FormatError(f"config.json is not valid JSON ({e})", cfg) from None
            if not isinstance(config, dict):
                raise FormatError("config.json is not a JSON object", cfg)
        chosen: Path | None = None
        for fname in _FOLDER_WEIGHT_FILES:
            if (folder / fname).is_file():
                chosen = folder / fname
                break
        if chosen is None:
            indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
            singles = sorted(folder.glob("*.safetensors"))
            if len(indexes) == 1:
                chosen = indexes[0]
            elif not indexes and len(singles) == 1:
                chosen = singles[0]
            elif len(indexes) + len(singles) > 1:
                raise FormatError(
                    "folder holds several weight files and no standard index; pass one file: "
                    + ", ".join(x.name for x in indexes + singles),
                    folder,
                )
        if chosen is None:
            named = named_adapter_subfolders(folder)
            if named:  # PEFT saves adapters not called "default" in subfolders
                raise FormatError(f"folder holds PEFT adapters in subfolders ({', '.join(named[:5])}"
                                  f"{', ...' if len(named) > 5 else ''}); give one of them", folder)
            raise FormatError("folder holds no weights (no *.safetensors, index or pytorch_model.bin)", folder)
        ck = cls.open(chosen)
        ck.path = folder
        ck.config = config
        ck.weights_file = chosen
        return ck

    @classmethod
    def _open_safetensors(cls, p: Path) -> Checkpoint:
        infos, entries, meta = read_safetensors_header(p)
        ck = cls(p, "safetensors", infos, meta, [p])
        ck._st = entries
        ck.weights_file = p
        return ck

    @classmethod
    def _open_index(cls, index: Path) -> Checkpoint:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"shard index is not valid JSON ({e})", index) from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise FormatError("shard index has no weight_map", index)
        folder = index.parent
        for rel in wm.values():
            if not isinstance(rel, str):  # before set(): a list or object would not even hash
                raise UnsafeFileError(f"shard index names {rel!r:.60}, which is not a file inside its folder", index)
        shards: dict[str, Path] = {}
        for rel in sorted(set(wm.values()), key=str):
            target = _safe_join(folder, rel, index)
            if not target.exists():
                raise FormatError(f"shard index points to a missing shard {rel!r}", index)
            what = _not_a_file(target)
            if what:
                raise FormatError(f"shard index names {rel!r}, which is {what}, not a file", index)
            shards[rel] = target
        if all(str(r).lower().endswith(".safetensors") for r in shards):
            infos: dict[str, TensorInfo] = {}
            entries: dict[str, _StEntry] = {}
            meta: dict[str, str] = {}
            for rel, shard in shards.items():
                si, se, sm = read_safetensors_header(shard)
                meta.update(sm)
                for n in si:
                    if wm.get(n) == rel:
                        infos[n] = si[n]
                        entries[n] = se[n]
            missing = sorted(set(wm) - set(infos))
            if missing:
                raise FormatError(
                    f"shard index lists {len(missing)} tensor(s) missing from their shards, e.g. {missing[0]!r}",
                    index,
                )
            ck = cls(index, "sharded-safetensors", infos, meta, list(shards.values()))
            ck._st = entries
            ck.weights_file = index
            return ck
        ck = cls._open_pickles(index, list(shards.values()),
                               {n: shards[rel] for n, rel in wm.items() if isinstance(n, str)})
        ck.kind = "sharded-pickle"
        return ck

    @classmethod
    def _open_pickles(cls, p: Path, files: list[Path], weight_map: dict[str, Path] | None = None) -> Checkpoint:
        """One ``.pt``/``.bin`` file, or the shards of an index: then each tensor comes from the
        shard ``weight_map`` names (as transformers reads them), and a listed tensor that its
        shard lacks is an error."""
        infos: dict[str, TensorInfo] = {}
        owners: dict[str, Path] = {}
        for f in files:
            sd = _load_pickle_state_dict(f)
            for n, t in sd.items():
                if weight_map is not None and weight_map.get(n) != f:
                    continue
                try:
                    dt = dtype_name(t.dtype)
                except FormatError as e:
                    raise FormatError(f"tensor {_q(n)}: {e.message}", f) from None
                infos[n] = TensorInfo(n, tuple(t.shape), dt, t.numel() * t.element_size(), f.name)
                owners[n] = f
            del sd
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(infos))
            if missing:
                raise FormatError(
                    f"shard index lists {len(missing)} tensor(s) missing from their shards, e.g. {missing[0]!r}", p)
        ck = cls(p, "pickle" if len(files) == 1 else "sharded-pickle", infos, {}, files)
        ck._pt_files = owners
        ck.weights_file = p
        return ck

    # ---------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Tensor names in a stable (sorted) order."""
        return sorted(self._infos)

    def infos(self) -> list[TensorInfo]:
        return [self._infos[n] for n in self.names()]

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise FormatError(f"no tensor named {name!r}", self.path) from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into new memory owned by the caller.

        Args:
            into: optional 1-D uint8 CPU tensor of at least the tensor's byte size; a safetensors
                tensor is then read into its first bytes and returned as a view of it (the caller
                reuses the buffer, so streaming reads stop faulting in fresh pages). Ignored for
                ``.pt`` inputs.
        """
        info = self.info(name)
        if name in self._st:
            e = self._st[name]
            if into is not None and (into.dtype != torch.uint8 or into.ndim != 1 or into.numel() < e.nbytes
                                     or not into.is_contiguous()):
                raise ValueError("into: a contiguous 1-D uint8 tensor at least as large as the tensor is needed")
            buf = _read_exact(e.path, e.begin, e.nbytes, into)
            if e.nbytes == 0:
                return torch.empty(info.shape, dtype=ST_DTYPES[info.dtype])
            return buf.view(ST_DTYPES[info.dtype]).reshape(info.shape)
        f = self._pt_files[name]
        cached = self._pt_cache.get(f)
        if cached is None or (cached[1] > _PT_REOPEN_BYTES and _is_zip_pickle(f)):
            # Drop the old mapping (its pages leave our resident set) and map the file again.
            # torch frees a mapped file's storages through the garbage collector: collect
            # before mapping again, or both mappings stay resident. A legacy (not zip) .pt
            # cannot be mapped: it is loaded whole once and kept (memory ~ its size).
            cached = None
            self._pt_cache.pop(f, None)
            gc.collect()
            cached = (_load_pickle_state_dict(f), 0)
        sd, touched = cached
        t = sd[name].detach().clone(memory_format=torch.contiguous_format)
        self._pt_cache[f] = (sd, touched + info.nbytes)
        return t

    def items(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in sorted order unless ``names`` is given."""
        for n in names if names is not None else self.names():
            yield n, self.get(n)

    def close(self) -> None:
        if self._pt_cache:
            self._pt_cache.clear()
            gc.collect()  # release the mapped files' pages now (see ``get``)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def total_params(self) -> int:
        return sum(i.numel for i in self._infos.values())


def _load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (mmap when the file allows); unwrap nested dicts."""
    require_regular_file(path)
    mmap = _is_zip_pickle(path)
    try:
        with warnings.catch_warnings():  # torch warns about raw pickles on stderr; the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise UnsafeFileError(
                "refusing to load: this pickle needs code to load (weights_only=True rejected it); "
                "convert it to safetensors with the code that made it",
                path,
            ) from None
        detail = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next((ln for ln in detail if ln.startswith(("Unsupported", "WeightsUnpickler"))), "unpickling failed")
        raise FormatError(f"not a valid PyTorch checkpoint ({why[:200]})", path) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"not a valid PyTorch checkpoint ({first[:200]})", path) from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "module", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    if not isinstance(obj, dict):
        raise FormatError(f"expected a state dict (a mapping of names to tensors), found {type(obj).__name__}", path)
    out: dict[str, torch.Tensor] = {}

    def flatten(d: dict[Any, Any], prefix: str, depth: int) -> None:
        # Nested mappings of tensors beside the weights (an EMA copy, a sub-model) keep their
        # tensors under dotted names instead of being dropped; plain values (step counts) are not weights.
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                if name in out:
                    raise FormatError(f"tensor name {name!r} appears twice once nested mappings are flattened", path)
                out[name] = v
            elif isinstance(v, dict) and depth < 4:
                flatten(v, f"{name}.", depth + 1)

    flatten(obj, "", 0)
    if not out:
        raise FormatError("holds no tensors", path)
    return out
