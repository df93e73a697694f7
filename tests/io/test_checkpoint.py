"""The lazy reader on every format, and its refusal of bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasurgeon.errors import FormatError, InputNotFoundError, UnsafeFileError
from lorasurgeon.io.checkpoint import Checkpoint
from tests.conftest import small_state_dict


def assert_same(ck: Checkpoint, sd: dict[str, torch.Tensor]) -> None:
    assert ck.names() == sorted(sd)
    for n, t in sd.items():
        info = ck.info(n)
        assert info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size()
        got = ck.get(n)
        assert got.dtype == t.dtype
        assert torch.equal(got, t), n


def test_safetensors_single(tmp_path: Path) -> None:
    sd = small_state_dict()
    save_file(sd, tmp_path / "m.safetensors", metadata={"k": "v"})
    with Checkpoint.open(tmp_path / "m.safetensors") as ck:
        assert ck.kind == "safetensors"
        assert ck.metadata == {"k": "v"}
        assert_same(ck, sd)
        assert ck.total_params == sum(t.numel() for t in sd.values())


def test_returned_tensor_is_owned(tmp_path: Path) -> None:
    sd = small_state_dict()
    save_file(sd, tmp_path / "m.safetensors")
    ck = Checkpoint.open(tmp_path / "m.safetensors")
    a = ck.get("conv.weight")
    a.zero_()
    assert torch.equal(ck.get("conv.weight"), sd["conv.weight"])


def _write_sharded(folder: Path, sd: dict[str, torch.Tensor], index_name: str = "model.safetensors.index.json") -> None:
    names = sorted(sd)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, folder / fname)
        wm.update({n: fname for n in part})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def test_sharded_folder_and_index(tmp_path: Path) -> None:
    sd = small_state_dict()
    _write_sharded(tmp_path, sd)
    for p in (tmp_path, tmp_path / "model.safetensors.index.json"):
        with Checkpoint.open(p) as ck:
            assert ck.kind == "sharded-safetensors"
            assert len(ck.files) == 2
            assert_same(ck, sd)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_pickle_state_dicts(tmp_path: Path, wrap: str | None) -> None:
    sd = small_state_dict()
    obj = sd if wrap is None else {wrap: sd, "epoch": 3}
    torch.save(obj, tmp_path / "m.pt")
    with Checkpoint.open(tmp_path / "m.pt") as ck:
        assert ck.kind == "pickle"
        assert_same(ck, sd)


def test_legacy_pickle_without_zip(tmp_path: Path) -> None:
    sd = small_state_dict()
    torch.save(sd, tmp_path / "m.bin", _use_new_zipfile_serialization=False)
    with Checkpoint.open(tmp_path / "m.bin") as ck:
        assert_same(ck, sd)


def test_pickle_reopens_past_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorasurgeon.io.checkpoint as mod

    monkeypatch.setattr(mod, "_PT_REOPEN_BYTES", 1)
    calls = []
    real = mod._load_pickle_state_dict
    monkeypatch.setattr(mod, "_load_pickle_state_dict", lambda p: calls.append(p) or real(p))
    sd = small_state_dict()
    torch.save(sd, tmp_path / "m.pt")
    ck = Checkpoint.open(tmp_path / "m.pt")
    assert_same(ck, sd)
    assert len(calls) > 3  # reopened after each tensor past the (tiny) budget


def test_hf_model_folder(tmp_path: Path) -> None:
    sd = small_state_dict()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 12}))
    save_file(sd, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as ck:
        assert ck.config["model_type"] == "bert"
        assert ck.weights_file.name == "model.safetensors"
        assert_same(ck, sd)


def test_hf_folder_with_bin(tmp_path: Path) -> None:
    sd = small_state_dict()
    (tmp_path / "config.json").write_text("{}")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with Checkpoint.open(tmp_path) as ck:
        assert_same(ck, sd)


# ----------------------------------------------------------------------------- errors
def _valid(tmp_path: Path) -> Path:
    p = tmp_path / "ok.safetensors"
    save_file(small_state_dict(), p)
    return p


def _with_header(tmp_path: Path, header: dict, data: bytes, name: str = "bad.safetensors") -> Path:
    raw = json.dumps(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="no such file"):
        Checkpoint.open(tmp_path / "nope.safetensors")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FormatError, match="folder holds no weights"):
        Checkpoint.open(tmp_path)


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(FormatError, match="unknown checkpoint extension"):
        Checkpoint.open(tmp_path / "m.h5")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(FormatError, match="shorter than the 8-byte header length"):
        Checkpoint.open(tmp_path / "e.safetensors")


def test_truncated_everywhere(tmp_path: Path) -> None:
    data = _valid(tmp_path).read_bytes()
    for cut in sorted({1, 7, 8, 9, 20, len(data) // 2, len(data) - 1}):
        p = tmp_path / f"t{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            Checkpoint.open(p)


def test_lying_header_length_does_not_allocate(tmp_path: Path) -> None:
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="header claims 1000000000000 bytes"):
        Checkpoint.open(p)
    p.write_bytes(struct.pack("<Q", 4096) + b"{}")
    with pytest.raises(FormatError, match="truncated or corrupt"):
        Checkpoint.open(p)


def test_random_bytes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    p = tmp_path / "r.safetensors"
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(FormatError):
        Checkpoint.open(p)


def test_offsets_past_end(tmp_path: Path) -> None:
    p = _with_header(tmp_path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(FormatError, match="lie outside the 8-byte data section"):
        Checkpoint.open(p)


def test_overlapping_offsets(tmp_path: Path) -> None:
    h = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(FormatError, match="overlap"):
        Checkpoint.open(_with_header(tmp_path, h, b"\0" * 12))


def test_unknown_dtype_and_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="unknown dtype 'F128'"):
        Checkpoint.open(_with_header(tmp_path, {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16))
    with pytest.raises(FormatError, match=r"needs 12 bytes but its offsets span 16"):
        Checkpoint.open(_with_header(tmp_path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16))


def test_pickle_needing_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="needs code to load"):
        Checkpoint.open(tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"definitely not a pickle")
    with pytest.raises(FormatError, match="not a valid PyTorch checkpoint"):
        Checkpoint.open(tmp_path / "junk.pt")


def test_index_pointing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, outside)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(UnsafeFileError, match="points outside its folder"):
        Checkpoint.open(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": str(outside)}}))
    with pytest.raises(UnsafeFileError, match="not a file inside its folder"):
        Checkpoint.open(folder)
    # names JSON can hold and no file can (found by the slow fuzz suite): a NUL byte, a lone surrogate
    for rel, says in (("\x00", "not a file inside its folder"), ("a\ud800.safetensors", "which is not a file name")):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": rel}}))
        with pytest.raises(UnsafeFileError, match=says):
            Checkpoint.open(folder)


def test_index_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FormatError, match="missing shard 'gone.safetensors'"):
        Checkpoint.open(tmp_path)


def test_safetensors_without_its_extension_is_recognised(tmp_path: Path) -> None:
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, tmp_path / "merged")
    with Checkpoint.open(tmp_path / "merged") as ck:
        assert ck.names() == ["a.weight"] and torch.equal(ck.get("a.weight"), sd["a.weight"])
    (tmp_path / "notes").write_bytes(b"{\"a\": 1}\n" * 3)  # neither: still the extension error
    with pytest.raises(FormatError, match="unknown checkpoint extension"):
        Checkpoint.open(tmp_path / "notes")


def test_pickle_with_nested_tensor_mappings_keeps_them(tmp_path: Path) -> None:
    """An EMA copy or sub-model beside the weights keeps its tensors under dotted names; plain
    values (a step count) are not weights."""
    torch.save({"fc.weight": torch.ones(2, 2), "ema": {"fc.weight": torch.full((2, 2), 2.0)}, "step": 5}, tmp_path / "c.pt")
    with Checkpoint.open(tmp_path / "c.pt") as ck:
        assert ck.names() == ["ema.fc.weight", "fc.weight"]
        assert torch.equal(ck.get("ema.fc.weight"), torch.full((2, 2), 2.0))


def _raw_header(tmp_path: Path, header_json: bytes, data: bytes, name: str = "raw.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)
    return p


def test_headers_the_safetensors_library_refuses_are_refused(tmp_path: Path) -> None:
    # json.loads keeps the last of two equal keys: this reader would have read one tensor and the
    # safetensors library refuses the file; gaps, trailing bytes and non-map metadata likewise
    from safetensors import SafetensorError, safe_open

    a = b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    cases = {
        "dup": (b"{" + a + b", " + a.replace(b"[0, 8]", b"[8, 16]") + b"}", b"\0" * 16, "corrupt safetensors header: 'a' appears twice"),
        "gap": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 12,
                "corrupt safetensors file: 4 unused bytes before tensor 'a'"),
        "trailing": (b"{" + a + b"}", b"\0" * 9, "corrupt safetensors file: 1 bytes after the last tensor's data"),
        "meta0": (b'{"__metadata__": 0, ' + a + b"}", b"\0" * 8, "__metadata__ must map strings to strings"),
        "metalist": (b'{"__metadata__": [], ' + a + b"}", b"\0" * 8, "__metadata__ must map strings to strings"),
    }
    for name, (header, data, message) in cases.items():
        p = _raw_header(tmp_path, header, data, f"{name}.safetensors")
        with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Checkpoint.open(p)
        with pytest.raises(SafetensorError), safe_open(p, "pt") as f:  # the peer agrees
            f.get_tensor("a")
    # zero-size tensors sit anywhere in the tiling; null metadata is none
    ok = _raw_header(tmp_path, b'{"__metadata__": null, "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, '
                     + a + b"}", b"\0" * 8, "ok.safetensors")
    assert Checkpoint.open(ok).names() == ["a", "e"]


def test_fifos_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(FormatError, match=r"^is a FIFO \(named pipe\), not a checkpoint file"):
        Checkpoint.open(fifo)
    dev = tmp_path / "zero.safetensors"
    dev.symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="^is a device, not a checkpoint file"):
        Checkpoint.open(dev)
    (tmp_path / "sh").mkdir()
    save_file({"a": torch.ones(2)}, tmp_path / "sh" / "one.safetensors")
    os.mkfifo(tmp_path / "sh" / "two.safetensors")
    (tmp_path / "sh" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    with pytest.raises(FormatError, match=r"shard index names 'two.safetensors', which is a FIFO \(named pipe\), not a file") as e:
        Checkpoint.open(tmp_path / "sh")
    assert e.value.path.endswith("model.safetensors.index.json")


def test_bin_shard_index_decides_which_shard_holds_each_tensor(tmp_path: Path) -> None:
    # as transformers reads it: "w" from the shard the index names, not whichever loaded last
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"w": torch.ones(2), "x": torch.zeros(3)}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"w": -torch.ones(2)}, d / "pytorch_model-00002-of-00002.bin")
    index = d / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00002.bin",
                                                "x": "pytorch_model-00001-of-00002.bin"}}))
    with Checkpoint.open(d) as ck:
        assert ck.names() == ["w", "x"] and ck.info("w").file == "pytorch_model-00001-of-00002.bin"
        assert torch.equal(ck.get("w"), torch.ones(2))
    index.write_text(json.dumps({"weight_map": {"w": "pytorch_model-00002-of-00002.bin",
                                                "ghost": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(FormatError, match=r"shard index lists 1 tensor\(s\) missing from their shards, e.g. 'ghost'"):
        Checkpoint.open(d)


def test_pickled_tensor_of_a_dtype_safetensors_lacks_names_file_and_tensor(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(FormatError, match=r"^tensor 'c': dtype torch.complex64 cannot be stored in safetensors$") as e:
        Checkpoint.open(tmp_path / "c.pt")
    assert e.value.path == str(tmp_path / "c.pt")


def test_raw_pickles_are_one_error_and_no_torch_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    import pickle

    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(FormatError, match=r"^not a valid PyTorch checkpoint \(Unsupported operand 149"):
        Checkpoint.open(tmp_path / "raw.pth")
    assert not [w for w in recwarn if "pickle" in str(w.message).lower()]
