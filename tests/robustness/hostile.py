"""Generators of valid and hostile inputs, the commands that read them, and the checks every
failure must pass (GUIDE §2: exit 1, one line on stderr naming the file and the problem, no
traceback, nothing written, no temp file, inputs untouched).

Everything is built from seeds in a temporary folder: no fixture files are checked in.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click.testing
import numpy as np
import torch
import typer
from safetensors.torch import save_file

from lorasurgeon.cli.app import app

ARCH = "lorasurgeon.zoo:mlp"
MAX_LINE = 400  # "one short line"
# typer's CliRunner rebuilds the Click command on every call (~60 ms); build it once: the same
# command object the console script runs, through Typer's public get_command.
COMMAND = typer.main.get_command(app)
runner = click.testing.CliRunner()


# ----------------------------------------------------------------------------- bytes
def st_bytes(header: dict | bytes, data: bytes = b"", hlen: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data. ``hlen`` lies."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data


def one_tensor(dtype: str = "F32", shape: Sequence[int] = (2, 2), offsets: Sequence[int] = (0, 16),
               name: str = "fc1.weight") -> dict:
    return {name: {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def mlp_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of ``lorasurgeon.zoo:mlp`` (64 → 256 → 256 → 10), seeded."""
    from lorasurgeon.zoo import mlp

    torch.manual_seed(seed)
    return {k: v.detach().contiguous() for k, v in mlp().state_dict().items()}


def tree_digest(path: Path) -> str:
    """sha256 over every file name and content under ``path`` (a file or a folder)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(os.fsencode(f.relative_to(path) if path.is_dir() else f.name))
        h.update(f.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(os.fsdecode(p.relative_to(folder)) for p in folder.rglob("*"))


def temp_leftovers(folder: Path) -> list[str]:
    return [n for n in listing(folder) if ".tmp-" in n or ".old-" in n or "train-state" in n]


# ----------------------------------------------------------------------------- valid inputs
@dataclass
class Valid:
    """A small consistent world: the base model, a fine-tune, adapters for it, its factorization."""

    root: Path
    base: Path  # zoo:mlp weights, safetensors
    tuned: Path  # base + a rank-2 change in fc1 and fc2
    peft: Path  # PEFT folder targeting fc1, fc2 (rank 2)
    peft2: Path  # a second PEFT adapter for the same model
    kohya: Path  # kohya file for the same targets
    fact: Path  # factorized base (fc1, fc2 at rank 4)
    data: Path  # 200 labelled digits (x: 200×1×8×8, y) as .npz: quicker to load than the named set


def peft_state(seed: int, rank: int = 2, dims: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = dims or {"fc1": (256, 64), "fc2": (256, 256)}
    sd = {}
    for m, (o, i) in dims.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.1
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.1
    return sd


def peft_config(rank: int = 2, alpha: float = 4.0, targets: Sequence[str] = ("fc1", "fc2")) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
            "use_rslora": False, "fan_in_fan_out": False}


def write_peft(folder: Path, state: dict[str, torch.Tensor], config: dict | str | bytes | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if config is not None:
        raw = config if isinstance(config, bytes) else (config if isinstance(config, str) else json.dumps(config)).encode()
        (folder / "adapter_config.json").write_bytes(raw)
    return folder


def make_valid(root: Path) -> Valid:
    from lorasurgeon.factorize import factorize_checkpoint
    from lorasurgeon.ops.ranks import RankRule

    root.mkdir(parents=True, exist_ok=True)
    base_sd = mlp_state(0)
    base = root / "base.safetensors"
    save_file(base_sd, base)
    g = torch.Generator().manual_seed(1)
    tuned_sd = dict(base_sd)
    for m in ("fc1", "fc2"):
        w = base_sd[f"{m}.weight"]
        tuned_sd[f"{m}.weight"] = w + 0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    tuned = root / "tuned.safetensors"
    save_file(tuned_sd, tuned)
    peft = write_peft(root / "peft", peft_state(2), peft_config())
    peft2 = write_peft(root / "peft2", peft_state(3), peft_config())
    kohya_sd: dict[str, torch.Tensor] = {}
    for k, v in peft_state(4).items():
        m = k.split(".")[2]
        kohya_sd[f"lora_{m}.lora_{'down' if '.lora_A.' in k else 'up'}.weight"] = v
        kohya_sd[f"lora_{m}.alpha"] = torch.tensor(4.0)
    kohya = root / "kohya.safetensors"
    save_file(kohya_sd, kohya)
    fact = root / "fact.safetensors"
    factorize_checkpoint(base, fact, rule=RankRule("rank", 4.0, None), include=["fc*"], svd_method="exact")
    from lorasurgeon.data import load_dataset

    digits = load_dataset("digits", limit=200)
    data = root / "digits200.npz"
    np.savez(data, x=digits.inputs["x"].numpy(), y=digits.labels.numpy())
    return Valid(root, base, tuned, peft, peft2, kohya, fact, data)


# ----------------------------------------------------------------------------- hostile cases
Builder = Callable[[Path, Valid], "tuple[Path, list[str]]"]


@dataclass(frozen=True)
class Case:
    """A hostile input. ``build(folder, valid)`` writes it under ``folder`` and returns the path to
    pass and the substrings one of which the error line must contain (the file it names).

    ``roles``: which argument kinds it is fed as (ckpt, adapter, data, fact). ``only``: restrict
    to these command slots. ``problem``: a regex the error line must match (case-insensitive).
    """

    id: str
    build: Builder
    roles: frozenset[str]
    problem: str = ""
    only: frozenset[str] | None = None
    skip: frozenset[str] = field(default_factory=frozenset)
    may_succeed: bool = False  # harmless lies (the memory test only): a correct read is fine too


def _file(name: str, content: bytes) -> Builder:
    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / name
        p.write_bytes(content)
        return p, [name]

    return build


FILE_ROLES = frozenset({"ckpt", "adapter", "data", "fact"})


def _valid_st_bytes() -> bytes:
    """A small valid safetensors file holding LoRA factors (so it is also a valid adapter)."""
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "a.safetensors"
        save_file(peft_state(7, dims={"fc1": (256, 64)}), p)
        return p.read_bytes()


def truncation_points(size: int, hlen: int, n: int | None, data_points: int = 40) -> list[int]:
    """Cut points of a file of ``size`` bytes with an ``hlen``-byte header: with ``n`` None, every
    byte of the length field and header and ``data_points`` spread over the data; otherwise
    ``n`` points spread over all three, boundaries included."""
    rng = random.Random(size)
    data = range(8 + hlen, size)
    if n is None:
        return sorted(set(range(0, 8 + hlen)) | set(rng.sample(data, k=min(data_points, len(data)))))
    fixed = {0, 1, 4, 7, 8, 9, 8 + hlen // 2, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, size - 4, size - 1}
    rest = [c for c in range(size) if c not in fixed]
    return sorted(fixed | set(rng.sample(rest, k=max(0, n - len(fixed)))))


def truncated_cases(n: int | None, data_points: int = 40) -> list[Case]:
    data = _valid_st_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    return [Case(f"truncated@{c}", _file("cut.safetensors", data[:c]), FILE_ROLES, "")
            for c in truncation_points(len(data), hlen, n, data_points)]


def random_cases(seeds: Sequence[int], lengths: Sequence[int] = (1, 8, 64, 4096)) -> list[Case]:
    out = []
    for s in seeds:
        for n in lengths:
            b = random.Random(s * 7919 + n).randbytes(n)
            out.append(Case(f"random{n}b-seed{s}", _file("rnd.safetensors", b), FILE_ROLES))
    return out


def _lying_hlen(h: int) -> Builder:
    return _file("lie.safetensors", st_bytes(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, hlen=h))


SURROGATE_KEY = b'{"fc1.weight\\udcff":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
RAW_BAD_UTF8_KEY = b'{"fc1.weight\xff\xfe":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'


def header_cases() -> list[Case]:
    """safetensors headers that lie or are malformed; each must be refused before any allocation."""
    z16 = b"\0" * 16
    c = [
        Case("empty", _file("empty.safetensors", b""), FILE_ROLES, "8-byte header"),
        Case("hlen-1e12", _lying_hlen(10**12), FILE_ROLES, "header claims 1000000000000 bytes"),
        Case("hlen-2^64-1", _lying_hlen(2**64 - 1), FILE_ROLES, "header claims"),
        Case("hlen-99MB-short-file", _lying_hlen(99 * 2**20), FILE_ROLES, "truncated or corrupt"),
        Case("hlen-past-eof-by-1", _file("lie.safetensors", st_bytes(b"{}", hlen=3)), FILE_ROLES, "truncated"),
        Case("header-not-utf8", _file("h.safetensors", st_bytes(b"\xff\xfe\xfd{}")), FILE_ROLES, "UTF-8"),
        Case("header-not-json", _file("h.safetensors", st_bytes(b"{not json")), FILE_ROLES, "JSON"),
        Case("header-json-array", _file("h.safetensors", st_bytes(b"[1,2,3]")), FILE_ROLES, "not a JSON object"),
        Case("header-trailing-garbage", _file("h.safetensors", st_bytes(b'{} {"x"')), FILE_ROLES, "JSON"),
        Case("offsets-past-end", _file("h.safetensors", st_bytes(one_tensor(shape=[4], offsets=[0, 16]), b"\0" * 8)),
             FILE_ROLES, "outside"),
        Case("offsets-1e12", _file("h.safetensors", st_bytes(one_tensor(shape=[250_000_000_000], offsets=[0, 10**12]), z16)),
             FILE_ROLES, "outside"),
        Case("offsets-negative", _file("h.safetensors", st_bytes(one_tensor(shape=[1], offsets=[-4, 0]), z16)),
             FILE_ROLES, "outside"),
        Case("offsets-reversed", _file("h.safetensors", st_bytes(one_tensor(shape=[1], offsets=[8, 4]), z16)),
             FILE_ROLES, "outside"),
        Case("offsets-not-ints", _file("h.safetensors", st_bytes(one_tensor(offsets=["0", 16]), z16)), FILE_ROLES,
             "data_offsets"),
        Case("overlapping", _file("h.safetensors", st_bytes(
            {**one_tensor(shape=[2], offsets=[0, 8], name="fc1.weight"),
             **one_tensor(shape=[2], offsets=[4, 12], name="fc2.weight")}, z16)), FILE_ROLES, "overlap"),
        Case("duplicate-span", _file("h.safetensors", st_bytes(
            {**one_tensor(shape=[2, 2], offsets=[0, 16], name="fc1.weight"),
             **one_tensor(shape=[2, 2], offsets=[0, 16], name="fc2.weight")}, z16)), FILE_ROLES, "overlap"),
        Case("unknown-dtype", _file("h.safetensors", st_bytes(one_tensor(dtype="F128"), z16)), FILE_ROLES, "unknown dtype"),
        Case("dtype-not-string", _file("h.safetensors", st_bytes(one_tensor(dtype=[1]), z16)), FILE_ROLES, "dtype"),
        Case("shape-bytes-mismatch", _file("h.safetensors", st_bytes(one_tensor(shape=[3]), z16)), FILE_ROLES,
             "needs 12 bytes"),
        Case("shape-overflow", _file("h.safetensors", st_bytes(one_tensor(shape=[2**62, 2**62]), z16)), FILE_ROLES,
             "bytes"),
        Case("shape-negative", _file("h.safetensors", st_bytes(one_tensor(shape=[-2, -2]), z16)), FILE_ROLES, "shape"),
        Case("shape-float", _file("h.safetensors", st_bytes(one_tensor(shape=[2.0, 2]), z16)), FILE_ROLES, "shape"),
        Case("shape-bool", _file("h.safetensors", st_bytes(one_tensor(shape=[True, 4]), z16)), FILE_ROLES, "shape"),
        Case("entry-not-object", _file("h.safetensors", st_bytes({"fc1.weight": [1, 2]}, z16)), FILE_ROLES, "not an object"),
        Case("metadata-not-strings", _file("h.safetensors", st_bytes({"__metadata__": {"a": 1}, **one_tensor()}, z16)),
             FILE_ROLES, "__metadata__"),
        Case("key-lone-surrogate", _file("h.safetensors", st_bytes(SURROGATE_KEY, z16)), FILE_ROLES, "UTF-8"),
        Case("key-raw-invalid-utf8", _file("h.safetensors", st_bytes(RAW_BAD_UTF8_KEY, z16)), FILE_ROLES, "UTF-8"),
        Case("metadata-lone-surrogate", _file("h.safetensors", st_bytes(
            b'{"__metadata__":{"k":"v\\ud800"},' + SURROGATE_KEY[1:].replace(b"\\udcff", b""), z16)), FILE_ROLES, "UTF-8"),
        Case("huge-dims-zero-bytes", _file("h.safetensors", st_bytes(one_tensor(shape=[0, 2**63], offsets=[0, 0]), b"")),
             FILE_ROLES, "shape"),
        Case("name-10k-chars", _file("h.safetensors", st_bytes(one_tensor(dtype="F99", name="w" * 10_000), z16)),
             FILE_ROLES, "unknown dtype"),
    ]
    return c


# --- pickles ------------------------------------------------------------------------------
class _Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch '{self.marker}'",))


class _EvalEvil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (eval, (f"open({self.marker!r}, 'w').close()",))


def marker_path(d: Path) -> Path:
    return d / "PWNED"


def _evil_torch_save(name: str, legacy: bool, evil_cls: type = _Evil, wrap: str | None = None) -> Builder:
    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / name
        obj: object = {"fc1.weight": torch.zeros(2, 2), "payload": evil_cls(marker_path(d))}
        if wrap:
            obj = {wrap: obj}
        torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
        return p, [name]

    return build


def _evil_raw_pickle(name: str) -> Builder:
    """A bare pickle (protocol 2, no torch framing): GLOBAL posix.system + REDUCE."""

    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / name
        p.write_bytes(pickle.dumps(_Evil(marker_path(d)), protocol=2))
        return p, [name]

    return build


def _evil_in_zip(name: str) -> Builder:
    """A torch zip checkpoint whose data.pkl was replaced by a code-running pickle."""

    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        good = d / "good.pt"
        torch.save({"fc1.weight": torch.zeros(2, 2)}, good)
        p = d / name
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(p, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                if item.filename.endswith("data.pkl"):
                    data = pickle.dumps(_Evil(marker_path(d)), protocol=2)
                zout.writestr(item, data)
        good.unlink()
        return p, [name]

    return build


def _evil_peft_bin(d: Path, v: Valid) -> tuple[Path, list[str]]:
    folder = d / "evil_adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(peft_config()))
    state = {**peft_state(2), "payload": _Evil(marker_path(d))}
    torch.save(state, folder / "adapter_model.bin")
    return folder, ["adapter_model.bin"]


def _evil_hf_folder(d: Path, v: Valid) -> tuple[Path, list[str]]:
    folder = d / "evil_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"fc1.weight": torch.zeros(2), "payload": _Evil(marker_path(d))}, folder / "pytorch_model.bin")
    return folder, ["pytorch_model.bin"]


def _evil_sharded_pickle(d: Path, v: Valid) -> tuple[Path, list[str]]:
    folder = d / "evil_sharded"
    folder.mkdir()
    torch.save({"fc1.weight": torch.zeros(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"fc2.weight": torch.zeros(2), "payload": _Evil(marker_path(d))}, folder / "pytorch_model-00002-of-00002.bin")
    wm = {"fc1.weight": "pytorch_model-00001-of-00002.bin", "fc2.weight": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    return folder, ["pytorch_model-00002-of-00002.bin"]


def _long1(n: int) -> bytes:
    """The pickle LONG1 opcode for ``n`` (8 bytes, little-endian two's complement)."""
    return b"\x8a\x08" + n.to_bytes(8, "little", signed=True)


def _patch_after(b: bytes, anchor: bytes, old: bytes, new: bytes) -> bytes:
    i = b.find(anchor)
    j = b.find(old, i)
    assert i >= 0 and j > i, (anchor, old)
    return b[:j] + new + b[j + len(old):]


def _lying_legacy_pickle(numel: int) -> Builder:
    """A legacy (non-zip) torch pickle whose storage record claims ``numel`` float32 elements."""

    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "lying.pt"
        torch.save({"fc1.weight": torch.zeros(4)}, p, _use_new_zipfile_serialization=False)
        # the persistent id ('storage', FloatStorage, key, 'cpu', 4): the 4 is K\x04 after 'cpu'
        p.write_bytes(_patch_after(p.read_bytes(), b"cpu", b"K\x04", _long1(numel)))
        return p, ["lying.pt"]

    return build


def _lying_zip_pickle(what: str, n: int) -> Builder:
    """A zip torch checkpoint whose storage record (``storage``) or tensor size (``size``) claims
    ``n`` elements while the file holds 4."""

    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        good = d / "good.pt"
        torch.save({"fc1.weight": torch.zeros(4)}, good)
        p = d / "lying_zip.pt"
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(p, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                if item.filename.endswith("data.pkl"):
                    if what == "storage":
                        data = _patch_after(data, b"cpu", b"K\x04", _long1(n))
                    else:
                        data = _patch_after(data, b"K\x00", b"K\x04\x85", _long1(n) + b"\x85")
                zout.writestr(item, data)
        good.unlink()
        return p, ["lying_zip.pt"]

    return build


PICKLE_ROLES = frozenset({"ckpt", "adapter", "fact"})


def pickle_cases() -> list[Case]:
    return [
        Case("pickle-os-system-zip", _evil_torch_save("evil.pt", legacy=False), PICKLE_ROLES, "needs code"),
        Case("pickle-os-system-legacy", _evil_torch_save("evil.bin", legacy=True), PICKLE_ROLES, "needs code"),
        Case("pickle-eval-nested", _evil_torch_save("evil.pth", legacy=False, evil_cls=_EvalEvil, wrap="state_dict"),
             PICKLE_ROLES, "needs code"),
        Case("pickle-raw-protocol2", _evil_raw_pickle("evil.ckpt"), PICKLE_ROLES, "needs code|not a valid PyTorch"),
        Case("pickle-evil-data.pkl-in-zip", _evil_in_zip("evil_zip.pt"), PICKLE_ROLES, "needs code"),
        Case("pickle-peft-adapter_model.bin", _evil_peft_bin, frozenset({"adapter"}), "needs code"),
        Case("pickle-hf-folder-bin", _evil_hf_folder, frozenset({"ckpt"}), "needs code"),
        Case("pickle-sharded-bin", _evil_sharded_pickle, frozenset({"ckpt"}), "needs code"),
        Case("pickle-empty", _file("empty.pt", b""), PICKLE_ROLES, "not a valid PyTorch"),
        Case("pickle-random", _file("rnd.pt", random.Random(5).randbytes(512)), PICKLE_ROLES, "not a valid PyTorch"),
        Case("pickle-truncated-zip", _truncated_zip, PICKLE_ROLES, "not a valid PyTorch"),
        Case("pickle-legacy-storage-claims-8GiB", _lying_legacy_pickle(2**31), PICKLE_ROLES, "not a valid PyTorch"),
        Case("pickle-legacy-storage-claims-4TiB", _lying_legacy_pickle(2**40), PICKLE_ROLES, "not a valid PyTorch"),
        Case("pickle-zip-size-claims-4GiB", _lying_zip_pickle("size", 2**30), PICKLE_ROLES, "not a valid PyTorch"),
    ]


def _truncated_zip(d: Path, v: Valid) -> tuple[Path, list[str]]:
    p = d / "trunc.pt"
    torch.save(mlp_state(0), p)
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])
    return p, ["trunc.pt"]


# --- folders and shard indexes -------------------------------------------------------------
def _sharded(d: Path, wm: dict, extra: Callable[[Path], None] | None = None, name: str = "sharded",
             index_bytes: bytes | None = None) -> tuple[Path, list[str]]:
    folder = d / name
    folder.mkdir()
    save_file({"fc1.weight": torch.zeros(256, 64)}, folder / "model-00001-of-00002.safetensors")
    idx = folder / "model.safetensors.index.json"
    idx.write_bytes(index_bytes if index_bytes is not None else json.dumps({"weight_map": wm}).encode())
    if extra:
        extra(folder)
    return folder, ["model.safetensors.index.json"]


def folder_cases() -> list[Case]:
    s1 = "model-00001-of-00002.safetensors"

    def outside(d: Path, v: Valid):  # noqa: ANN202
        save_file({"fc2.weight": torch.zeros(2)}, d / "secret.safetensors")
        return _sharded(d, {"fc1.weight": s1, "fc2.weight": "../secret.safetensors"})

    def absolute(d: Path, v: Valid):  # noqa: ANN202
        save_file({"fc2.weight": torch.zeros(2)}, d / "secret.safetensors")
        return _sharded(d, {"fc1.weight": s1, "fc2.weight": str(d / "secret.safetensors")})

    def symlink(d: Path, v: Valid):  # noqa: ANN202
        save_file({"fc2.weight": torch.zeros(2)}, d / "secret.safetensors")
        return _sharded(d, {"fc1.weight": s1, "fc2.weight": "link.safetensors"},
                        lambda f: (f / "link.safetensors").symlink_to(d / "secret.safetensors"))

    def dir_shard(d: Path, v: Valid):  # noqa: ANN202
        return _sharded(d, {"fc1.weight": s1, "fc2.weight": "sub"}, lambda f: (f / "sub").mkdir())

    def lying_shard(d: Path, v: Valid):  # noqa: ANN202
        s2 = "model-00002-of-00002.safetensors"
        f, _ = _sharded(d, {"fc1.weight": s1, "fc2.weight": s2},
                        lambda f: (f / s2).write_bytes(st_bytes(b"{}", hlen=10**12)))
        return f, [s2]

    def hf_bad_config(d: Path, v: Valid):  # noqa: ANN202
        f = d / "hf"
        f.mkdir()
        (f / "config.json").write_bytes(b"{\"model_type\": \xff")
        save_file(mlp_state(0), f / "model.safetensors")
        return f, ["config.json"]

    def hf_list_config(d: Path, v: Valid):  # noqa: ANN202
        f = d / "hf"
        f.mkdir()
        (f / "config.json").write_text("[1, 2]")
        save_file(mlp_state(0), f / "model.safetensors")
        return f, ["config.json"]

    def several(d: Path, v: Valid):  # noqa: ANN202
        f = d / "several"
        f.mkdir()
        save_file({"a": torch.zeros(1)}, f / "a.safetensors")
        save_file({"b": torch.zeros(1)}, f / "b.safetensors")
        return f, ["several"]

    def empty_folder(d: Path, v: Valid):  # noqa: ANN202
        f = d / "nothing"
        f.mkdir()
        return f, ["nothing"]

    return [
        Case("index-outside-folder", outside, frozenset({"ckpt"}), "outside its folder"),
        Case("index-absolute-path", absolute, frozenset({"ckpt"}), "not a file inside its folder"),
        Case("index-symlink-escapes", symlink, frozenset({"ckpt"}), "outside its folder"),
        Case("index-missing-shard", lambda d, v: _sharded(d, {"fc1.weight": s1, "fc2.weight": "gone.safetensors"}),
             frozenset({"ckpt"}), "missing shard"),
        Case("index-shard-is-folder", dir_shard, frozenset({"ckpt"}), "missing shard|not a file"),
        Case("index-tensor-not-in-shard", lambda d, v: _sharded(d, {"fc1.weight": s1, "fc9.weight": s1}),
             frozenset({"ckpt"}), "missing from their shards"),
        Case("index-not-json", lambda d, v: _sharded(d, {}, index_bytes=b"{oops"), frozenset({"ckpt"}), "JSON"),
        Case("index-not-utf8", lambda d, v: _sharded(d, {}, index_bytes=b'{"weight_map": "\xff"}'), frozenset({"ckpt"}),
             "JSON|UTF-8"),
        Case("index-empty-weight-map", lambda d, v: _sharded(d, {}), frozenset({"ckpt"}), "weight_map"),
        Case("index-weight-map-list", lambda d, v: _sharded(d, {}, index_bytes=b'{"weight_map": [1]}'), frozenset({"ckpt"}),
             "weight_map"),
        Case("index-value-unhashable", lambda d, v: _sharded(d, {"fc1.weight": [s1]}), frozenset({"ckpt"}),
             "not a file inside its folder"),
        Case("index-value-number", lambda d, v: _sharded(d, {"fc1.weight": 7}), frozenset({"ckpt"}),
             "not a file inside its folder"),
        Case("index-shard-lies", lying_shard, frozenset({"ckpt"}), "header claims"),
        Case("hf-config-not-json", hf_bad_config, frozenset({"ckpt"}), "config.json"),
        Case("folder-several-weights", several, frozenset({"ckpt"}), "several weight files"),
        Case("folder-without-weights", empty_folder, frozenset({"ckpt"}), "no weights"),
        Case("hf-config-json-list", hf_list_config, frozenset({"ckpt"}), "config.json"),
    ]


# --- adapters ---------------------------------------------------------------------------------
def _peft_case(config: dict | str | bytes | None, state: dict[str, torch.Tensor] | None = None,
               culprit: str = "adapter_config.json") -> Builder:
    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        f = write_peft(d / "adapter", state if state is not None else peft_state(2), config)
        return f, [culprit]

    return build


def _kohya_case(extra: dict[str, torch.Tensor]) -> Builder:
    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "kohya_bad.safetensors"
        sd = {"lora_fc1.lora_down.weight": torch.randn(2, 64), "lora_fc1.lora_up.weight": torch.randn(256, 2)}
        sd.update({f"lora_fc1.{k}": t for k, t in extra.items()})
        save_file(sd, p)
        return p, ["kohya_bad.safetensors"]

    return build


def _diffusers_case(meta: str) -> Builder:
    def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "diffusers_bad.safetensors"
        sd = {"unet.fc1.lora_A.weight": torch.randn(2, 64), "unet.fc1.lora_B.weight": torch.randn(256, 2)}
        save_file(sd, p, metadata={"lora_adapter_metadata": meta})
        return p, ["diffusers_bad.safetensors"]

    return build


def adapter_cases() -> list[Case]:
    A = frozenset({"adapter"})
    cfg = peft_config()
    no_b = {k: v for k, v in peft_state(2).items() if "fc2.lora_B" not in k}
    bad_chain = dict(peft_state(2))
    bad_chain["base_model.model.fc1.lora_B.weight"] = torch.zeros(256, 3)
    loha = {"base_model.model.fc1.hada_w1_a": torch.zeros(2, 2), "base_model.model.fc1.hada_w1_b": torch.zeros(2, 2)}

    def no_weights(d: Path, v: Valid) -> tuple[Path, list[str]]:
        f = d / "adapter"
        f.mkdir()
        (f / "adapter_config.json").write_text(json.dumps(cfg))
        return f, ["adapter"]

    def plain_ckpt(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "not_lora.safetensors"
        save_file({"fc1.weight": torch.zeros(4, 4)}, p)
        return p, ["not_lora.safetensors"]

    return [
        Case("config-not-json", _peft_case("{r: 2,"), A, "JSON"),
        Case("config-not-utf8", _peft_case(b'{"r": "\xff"}'), A, "JSON|UTF-8"),
        Case("config-json-list", _peft_case("[1, 2]"), A, "not a JSON object"),
        Case("config-missing-r", _peft_case({k: v for k, v in cfg.items() if k != "r"}, peft_state(2, rank=4),
                                            culprit="adapter"), A, "r=8"),
        Case("config-r-not-int", _peft_case({**cfg, "r": "two"}), A, "'r'|r must"),
        Case("config-r-null", _peft_case({**cfg, "r": None}), A, "'r'|r must"),
        Case("config-alpha-not-number", _peft_case({**cfg, "lora_alpha": "x"}), A, "lora_alpha"),
        Case("config-alpha-nan", _peft_case({**cfg, "lora_alpha": float("nan")}), A, "lora_alpha"),
        Case("config-rank-pattern-list", _peft_case({**cfg, "rank_pattern": ["fc1"]}), A, "rank_pattern"),
        Case("config-rank-pattern-bad-value", _peft_case({**cfg, "rank_pattern": {"fc1": "x"}}), A, "rank_pattern"),
        Case("config-rank-pattern-bad-regex", _peft_case({**cfg, "rank_pattern": {"fc(": 2}}), A, "rank_pattern"),
        # (inspect describes a PEFT folder of another method, exit 0: tests/test_peft_init.py)
        Case("config-peft-type-loha", _peft_case({**cfg, "peft_type": "LOHA"}), A, "not LoRA",
             skip=frozenset({"inspect-adapter"})),
        Case("config-missing-file", _peft_case(None, culprit="adapter"), A, "adapter_config.json"),
        Case("adapter-no-weights", no_weights, A, "no weights"),
        Case("adapter-unpaired", _peft_case(cfg, no_b, culprit="adapter"), A, "no B"),
        Case("adapter-ranks-do-not-chain", _peft_case(cfg, bad_chain, culprit="adapter"), A, "do not chain"),
        Case("adapter-loha", _peft_case(cfg, loha, culprit="adapter"), A, "LoHa"),
        Case("adapter-plain-checkpoint", plain_ckpt, A, "no LoRA tensors", skip=frozenset({"inspect-adapter"})),
        Case("kohya-alpha-not-scalar", _kohya_case({"alpha": torch.ones(3)}), A, "alpha"),
        Case("kohya-alpha-nan", _kohya_case({"alpha": torch.tensor(float("nan"))}), A, "alpha"),
        Case("diffusers-metadata-malformed", _diffusers_case(json.dumps({"unet.lora_alpha": "x"})), A,
             "lora_adapter_metadata"),
        Case("diffusers-alpha-pattern-list", _diffusers_case(json.dumps({"unet.alpha_pattern": ["fc1"]})), A,
             "lora_adapter_metadata"),
    ]


def wrong_model_cases() -> list[Case]:
    """Inputs valid on their own but made for another model: names or shapes do not fit."""

    def adapter_names(d: Path, v: Valid) -> tuple[Path, list[str]]:
        return write_peft(d / "other_names", peft_state(2, dims={"encoder.q": (256, 64)}), peft_config()), ["other_names"]

    def adapter_shapes(d: Path, v: Valid) -> tuple[Path, list[str]]:
        return write_peft(d / "other_shapes", peft_state(2, dims={"fc1": (256, 32), "fc2": (128, 256)}),
                          peft_config()), ["other_shapes"]

    def ckpt_names(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "other_model.safetensors"
        save_file({"enc.w.weight": torch.randn(256, 64), "enc.v.weight": torch.randn(256, 256)}, p)
        return p, ["other_model.safetensors"]

    def ckpt_shapes(d: Path, v: Valid) -> tuple[Path, list[str]]:
        from lorasurgeon.zoo import mlp

        torch.manual_seed(0)
        p = d / "other_shapes.safetensors"
        save_file({k: t.contiguous() for k, t in mlp(in_features=32).state_dict().items()}, p)
        return p, ["other_shapes.safetensors"]

    return [
        Case("adapter-other-model-names", adapter_names, frozenset({"adapter"}), "match no",
             only=frozenset({"merge-adapter", "export-adapter"})),
        Case("adapter-other-model-shapes", adapter_shapes, frozenset({"adapter"}), "do not fit|different models|differs",
             only=frozenset({"merge-adapter", "compose", "export-adapter"})),
        Case("ckpt-other-model-names", ckpt_names, frozenset({"ckpt"}), "match no|do not fit|differs|nothing to extract|share no tensor names",
             only=frozenset({"merge-base", "convert-base", "attach-model", "distill-teacher", "extract-tuned",
                             "export-model", "factorize-calibrated"})),
        Case("ckpt-other-model-shapes", ckpt_shapes, frozenset({"ckpt"}), "do not fit|in the base but|size",
             only=frozenset({"merge-base", "attach-model", "distill-teacher", "extract-tuned", "export-model",
                             "factorize-calibrated"})),
    ]


def _nonfinite(value: float) -> tuple[Builder, Builder]:
    def ckpt(d: Path, v: Valid) -> tuple[Path, list[str]]:
        sd = mlp_state(0)
        sd["fc2.weight"][3, 5] = value
        p = d / "nonfinite.safetensors"
        save_file(sd, p)
        return p, ["nonfinite.safetensors"]

    def adapter(d: Path, v: Valid) -> tuple[Path, list[str]]:
        sd = peft_state(2)
        sd["base_model.model.fc2.lora_B.weight"][7, 1] = value
        return write_peft(d / "nonfinite_adapter", sd, peft_config()), ["nonfinite_adapter"]

    return ckpt, adapter


def nonfinite_cases() -> list[Case]:
    out = []
    for label, val in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        ckpt, adapter = _nonfinite(val)
        out.append(Case(f"ckpt-{label}-weight", ckpt, frozenset({"ckpt"}), "NaN|Inf",
                        only=frozenset({"inspect-spectrum", "factorize", "extract-tuned", "merge-base",
                                        "attach-model", "distill-teacher", "export-model", "factorize-calibrated"})))
        out.append(Case(f"adapter-{label}-factor", adapter, frozenset({"adapter"}), "NaN|Inf",
                        only=frozenset({"merge-adapter", "resize", "compose", "convert", "export-adapter"})))
    return out


def factorized_metadata_cases() -> list[Case]:
    """Factorized checkpoints whose ``lorasurgeon`` metadata lies about the layers."""

    def fact(meta: object, tensors: dict[str, torch.Tensor] | None = None, name: str = "fact_bad.safetensors") -> Builder:
        def build(d: Path, v: Valid) -> tuple[Path, list[str]]:
            p = d / name
            sd = tensors if tensors is not None else {
                "fc1.weight_u": torch.randn(256, 4), "fc1.weight_v": torch.randn(4, 64),
                "fc1.bias": torch.zeros(256), "fc2.weight": torch.randn(256, 256), "fc2.bias": torch.zeros(256),
                "classifier.weight": torch.randn(10, 256), "classifier.bias": torch.zeros(10)}
            save_file(sd, p, metadata={"lorasurgeon": meta if isinstance(meta, str) else json.dumps(meta)})
            return p, [name]

        return build

    F = frozenset({"fact"})
    ok_layer = {"kind": "linear", "rank": 4, "shape": [256, 64]}
    return [
        Case("fact-meta-not-json", fact("{oops"), F, "metadata"),
        Case("fact-meta-list", fact("[1, 2]"), F, "metadata"),
        Case("fact-layers-list", fact({"format": "factorized", "layers": [1]}), F, "layers"),
        Case("fact-layer-no-shape", fact({"format": "factorized", "layers": {"fc1": {"kind": "linear", "rank": 4}}}),
             F, "fc1"),
        Case("fact-layer-bad-rank", fact({"format": "factorized", "layers": {"fc1": {**ok_layer, "rank": "four"}}}), F, "fc1"),
        Case("fact-layer-bad-kind", fact({"format": "factorized", "layers": {"fc1": {**ok_layer, "kind": "lstm"}}}), F, "fc1"),
        Case("fact-shape-lies", fact({"format": "factorized", "layers": {"fc1": {**ok_layer, "shape": [300, 64]}}}), F,
             "fc1"),
        Case("fact-rank-lies", fact({"format": "factorized", "layers": {"fc1": {**ok_layer, "rank": 3}}}), F, "fc1"),
        Case("fact-missing-factor", fact({"format": "factorized", "layers": {"fc1": ok_layer, "fc2": {**ok_layer, "shape": [256, 256]}}}),
             F, "fc2"),
        Case("fact-not-factorized", fact({"format": "dense"}), F, "not a lorasurgeon factorized|do not fit"),
        Case("fact-layer-unknown-module", fact({"format": "factorized", "layers": {"enc.q": ok_layer}}), F,
             "enc.q|no tensor|has no"),
    ]


def data_cases() -> list[Case]:
    D = frozenset({"data"})

    def npz_pickle(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "evil.npz"
        arr = np.empty(1, dtype=object)
        arr[0] = _Evil(marker_path(d))
        np.savez(p, x=arr)
        return p, ["evil.npz"]

    def npz_truncated(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "cut.npz"
        np.savez(p, x=np.zeros((8, 64), np.float32), y=np.arange(8))
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])
        return p, ["cut.npz"]

    def xy_mismatch(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "xy.safetensors"
        save_file({"x": torch.zeros(8, 64), "y": torch.zeros(5, dtype=torch.int64)}, p)
        return p, ["xy.safetensors"]

    def no_x(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "nox.safetensors"
        save_file({"inputs": torch.zeros(8, 64)}, p)
        return p, ["nox.safetensors"]

    def bad_png(d: Path, v: Valid) -> tuple[Path, list[str]]:
        f = d / "images"
        (f / "cat").mkdir(parents=True)
        (f / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(64))
        return f, ["0.png"]

    def nan_data(d: Path, v: Valid) -> tuple[Path, list[str]]:
        p = d / "nan_data.safetensors"
        x = torch.rand(64, 64)
        x[3, 3] = float("nan")
        save_file({"x": x, "y": torch.arange(64) % 10}, p)
        return p, ["nan_data.safetensors"]

    return [
        Case("csv-not-utf8", _file("t.csv", b"text,label\n\xff\xfe,1\n"), D, "cannot parse"),
        Case("jsonl-broken", _file("t.jsonl", b'{"text": "a", "label": 1}\n{"text": \n'), D, "cannot parse"),
        Case("jsonl-not-objects", _file("t.jsonl", b"[1]\n"), D, "not a JSON object"),
        Case("csv-empty", _file("t.csv", b""), D, "no rows"),
        Case("npz-object-array-pickle", npz_pickle, D, "npz|pickle"),
        Case("npz-truncated", npz_truncated, D, "npz"),
        Case("npz-random", _file("r.npz", random.Random(3).randbytes(300)), D, "npz"),
        Case("tensor-file-xy-mismatch", xy_mismatch, D, "rows"),
        Case("tensor-file-no-x", no_x, D, "'x'"),
        Case("image-folder-corrupt-png", bad_png, D, "cannot read image"),
        Case("data-nan", nan_data, D, "NaN|Inf"),
    ]


# ----------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Slot:
    """One file-reading argument of one command: ``argv(hostile, valid, out_dir)``."""

    id: str
    role: str
    argv: Callable[[Path, Valid, Path], list[str]]


def _s(*a: object) -> list[str]:
    return [os.fsdecode(x) if isinstance(x, Path) else str(x) for x in a]


TRAIN = ["--epochs", "1", "--batch-size", "256", "--quiet"]
SLOTS: list[Slot] = [
    Slot("inspect", "ckpt", lambda h, v, o: _s("inspect", h)),
    Slot("inspect-adapter", "adapter", lambda h, v, o: _s("inspect", h)),
    Slot("inspect-spectrum", "ckpt", lambda h, v, o: _s("inspect", h, "--spectrum")),
    Slot("factorize", "ckpt", lambda h, v, o: _s("factorize", h, "-o", o / "f.safetensors", "--rank", "2", "--quiet")),
    Slot("factorize-calibrated", "ckpt", lambda h, v, o: _s("factorize", h, "--arch", ARCH, "--calibration", v.data,
                                                           "--method", "svd-llm", "-o", o / "f.safetensors", "--rank", "2",
                                                           "--quiet")),
    Slot("factorize-calibration", "data", lambda h, v, o: _s("factorize", v.base, "--arch", ARCH, "--calibration", h,
                                                            "--method", "asvd", "-o", o / "f.safetensors", "--rank", "2",
                                                            "--quiet")),
    Slot("densify", "fact", lambda h, v, o: _s("factorize", "--densify", h, "-o", o / "d.safetensors", "--quiet")),
    Slot("merge-base", "ckpt", lambda h, v, o: _s("merge", h, v.peft, "-o", o / "m.safetensors", "--quiet")),
    Slot("merge-adapter", "adapter", lambda h, v, o: _s("merge", v.base, h, "-o", o / "m.safetensors", "--quiet")),
    Slot("resize", "adapter", lambda h, v, o: _s("resize", h, "-o", o / "r", "--rank", "1", "--quiet")),
    Slot("compose", "adapter", lambda h, v, o: _s("compose", v.peft, h, "-o", o / "c", "--quiet")),
    Slot("convert", "adapter", lambda h, v, o: _s("convert", h, "--to", "kohya", "-o", o / "k.safetensors", "--quiet")),
    Slot("convert-base", "ckpt", lambda h, v, o: _s("convert", v.kohya, "--to", "peft", "--base", h, "-o", o / "p", "--quiet")),
    Slot("extract-base", "ckpt", lambda h, v, o: _s("extract", "--base", h, "--tuned", v.tuned, "-o", o / "e", "--rank", "2",
                                                   "--quiet")),
    Slot("extract-tuned", "ckpt", lambda h, v, o: _s("extract", "--base", v.base, "--tuned", h, "-o", o / "e", "--rank", "2",
                                                    "--quiet")),
    Slot("attach-model", "ckpt", lambda h, v, o: _s("attach", h, "--arch", ARCH, "--data", v.data, "-o", o / "a",
                                                   "--target", "fc*", *TRAIN)),
    Slot("attach-data", "data", lambda h, v, o: _s("attach", v.base, "--arch", ARCH, "--data", h, "-o", o / "a",
                                                  "--target", "fc*", *TRAIN)),
    Slot("distill-teacher", "ckpt", lambda h, v, o: _s("distill", "--teacher", h, "--student", v.fact, "--arch", ARCH,
                                                      "--data", v.data, "-o", o / "s.safetensors", *TRAIN)),
    Slot("distill-student", "fact", lambda h, v, o: _s("distill", "--teacher", v.base, "--student", h, "--arch", ARCH,
                                                      "--data", v.data, "-o", o / "s.safetensors", *TRAIN)),
    Slot("export-model", "ckpt", lambda h, v, o: _s("export", h, "--arch", ARCH, "-o", o / "e.onnx", "--quiet")),
    Slot("export-fact", "fact", lambda h, v, o: _s("export", h, "--arch", ARCH, "-o", o / "e.onnx", "--quiet")),
    Slot("export-adapter", "adapter", lambda h, v, o: _s("export", v.base, "--arch", ARCH, "-a", h, "-o", o / "e.onnx",
                                                        "--quiet")),
    Slot("distill-data", "data", lambda h, v, o: _s("distill", "--teacher", v.base, "--student", v.fact, "--arch", ARCH,
                                                   "--data", h, "-o", o / "s.safetensors", *TRAIN)),
]
SLOT_BY_ID = {s.id: s for s in SLOTS}
# "fact" slots read a checkpoint too: every file-level case applies to them; "adapter" slots get
# the file cases as bare adapter files.


def applies(case: Case, slot: Slot) -> bool:
    if case.only is not None:
        return slot.id in case.only
    if slot.id in case.skip:
        return False
    if slot.id == "inspect-spectrum":
        return False  # covered by "inspect" except for the non-finite cases
    if slot.role == "fact" and "fact" in case.roles:
        return True
    return slot.role in case.roles and not (slot.role == "fact")


def matrix(cases: Sequence[Case], slots: Sequence[Slot] = SLOTS) -> list[tuple[Slot, Case]]:
    return [(s, c) for c in cases for s in slots if applies(c, s)]


# ----------------------------------------------------------------------------- checks
@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def invoke(argv: list[str]) -> Outcome:
    res = runner.invoke(COMMAND, argv, prog_name="lorasurgeon")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(res.exception))
        raise AssertionError(f"exception escaped the command {argv}:\n{tb}")
    return Outcome(res.exit_code, res.stdout, res.stderr)


def check_clean_failure(out: Outcome, culprits: Sequence[str], problem: str, out_dir: Path, code: int = 1) -> str:
    """The GUIDE §2 contract for a failed command; returns the error line."""
    import re

    ctx = f"\nstdout={out.stdout[-500:]!r}\nstderr={out.stderr[-1500:]!r}"
    assert out.code == code, f"exit {out.code}, expected {code}{ctx}"
    assert "Traceback" not in out.stderr, ctx
    lines = out.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr{ctx}"
    line = lines[0]
    assert line.startswith("error: "), ctx
    assert "internal error" not in line, ctx
    assert len(line) <= MAX_LINE, f"line of {len(line)} characters{ctx}"
    assert any(c in line for c in culprits), f"the line names none of {culprits}{ctx}"
    if problem:
        assert re.search(problem, line, re.IGNORECASE), f"the line does not say {problem!r}{ctx}"
    assert out.stdout == "", ctx
    left = listing(out_dir)
    assert left == [], f"left in the output folder: {left}{ctx}"
    return line
