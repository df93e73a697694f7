"""Property-based fuzzing of the parsers that see stranger's bytes first: the safetensors header
(``read_safetensors_header`` / ``Checkpoint.open``), shard indexes, PEFT configs and the factorized
metadata. Property: any input gives a valid result or a LorasurgeonError (exit 1), never another
exception. A Checkpoint that opens must also read every tensor it lists, at the shape it lists.

The fast suite runs a few dozen derandomized examples per property; ``make test-all`` runs
thousands, randomized.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.io.adapters import read_adapter
from lorasurgeon.io.checkpoint import ST_DTYPES, Checkpoint, read_safetensors_header
from lorasurgeon.nn.layers import factorized_layers
from tests.robustness.hostile import peft_config, peft_state, write_peft

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=1500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="lorasurgeon-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)


def _open_and_read(data: bytes, name: str = "f.safetensors") -> None:
    """The property: open; if that works, every tensor reads at its stated shape and dtype."""
    p = WORK / name
    p.write_bytes(data)
    try:
        ck = Checkpoint.open(p)
    except LorasurgeonError:
        return
    for n in ck.names():
        info = ck.info(n)
        try:
            t = ck.get(n)
        except LorasurgeonError:
            continue
        assert tuple(t.shape) == info.shape and t.dtype == ST_DTYPES[info.dtype]
        assert t.numel() * t.element_size() == info.nbytes
    # the header alone parses the same way
    infos, _, _ = read_safetensors_header(p)
    assert sorted(infos) == ck.names()


# ----------------------------------------------------------------------------- strategies
def _valid_file() -> bytes:
    p = WORK / "seed.safetensors"
    save_file({"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.int64),
               "c": torch.zeros(0)}, p, metadata={"k": "v"})
    return p.read_bytes()


SEED = _valid_file()
INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64, -(2**63), 10**12]))
DTYPES = st.one_of(st.sampled_from(sorted(ST_DTYPES)), st.sampled_from(["F128", "", "f32", "U4"]), st.integers(), st.none())
NAMES = st.text(st.characters(blacklist_categories=()), max_size=12)  # surrogates included
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
    max_leaves=12,
)


@st.composite
def lying_headers(draw: Callable) -> bytes:
    """A header of tensor entries whose dtypes, shapes and offsets may lie, a data section of a
    drawn length, and a length field that may lie too."""
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(NAMES, NAMES, max_size=3), JSONISH))
    for _ in range(draw(st.integers(0, 4))):
        entry = {"dtype": draw(DTYPES), "shape": draw(st.one_of(st.lists(INTS, max_size=4), JSONISH)),
                 "data_offsets": draw(st.one_of(st.lists(INTS, min_size=2, max_size=2), JSONISH))}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(JSONISH)
        header[draw(NAMES)] = entry
    raw = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    data = b"\x00" * draw(st.integers(0, 96))
    hlen = draw(st.one_of(st.just(len(raw)), st.just(len(raw)), INTS.filter(lambda n: 0 <= n < 2**64)))
    return struct.pack("<Q", hlen) + raw + data


@st.composite
def mutated(draw: Callable) -> bytes:
    """A valid file with a few bytes flipped, inserted, deleted, or the tail cut."""
    b = bytearray(SEED)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and b:
            del b[i]
        elif op == "cut":
            del b[i:]
    return bytes(b)


# ----------------------------------------------------------------------------- properties
def _header_properties(s: settings) -> list[Callable]:
    @s
    @given(st.binary(max_size=300))
    def any_bytes(data: bytes) -> None:
        _open_and_read(data)

    @s
    @given(lying_headers())
    def lying(data: bytes) -> None:
        _open_and_read(data)

    @s
    @given(mutated())
    def mutations(data: bytes) -> None:
        _open_and_read(data)

    return [any_bytes, lying, mutations]


@pytest.mark.parametrize("prop", _header_properties(FAST), ids=["any-bytes", "lying-headers", "mutations"])
def test_header_parser(prop: Callable) -> None:
    prop()


@pytest.mark.slow
@pytest.mark.parametrize("prop", _header_properties(SLOW), ids=["any-bytes", "lying-headers", "mutations"])
def test_header_parser_long(prop: Callable) -> None:
    prop()


def _other_properties(s: settings) -> list[Callable]:
    folder = WORK / "sharded"
    folder.mkdir(exist_ok=True)
    save_file({"a": torch.zeros(2)}, folder / "s1.safetensors")

    @s
    @given(st.one_of(JSONISH, st.fixed_dictionaries({"weight_map": st.dictionaries(NAMES, JSONISH, max_size=3)}),
                     st.fixed_dictionaries({"weight_map": st.dictionaries(
                         NAMES, st.sampled_from(["s1.safetensors", "../s1.safetensors", "/etc/passwd", "", "."]),
                         min_size=1, max_size=3)})))
    def shard_index(index: object) -> None:
        (folder / "model.safetensors.index.json").write_bytes(json.dumps(index).encode("utf-8", "surrogatepass"))
        try:
            ck = Checkpoint.open(folder)
        except LorasurgeonError:
            return
        for f in ck.files:  # whatever opened, it stayed inside the folder
            assert folder.resolve() in f.resolve().parents

    adapter = write_peft(WORK / "adapter", peft_state(2, dims={"fc1": (8, 6)}), peft_config())
    keys = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "peft_type",
            "target_modules", "modules_to_save"]

    @s
    @given(st.dictionaries(st.sampled_from(keys), JSONISH, max_size=5), st.booleans())
    def peft_configs(overrides: dict, keep_defaults: bool) -> None:
        cfg = {**(peft_config() if keep_defaults else {}), **overrides}
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        try:
            ad = read_adapter(adapter)
        except LorasurgeonError:
            return
        for t in ad.targets.values():
            assert math.isfinite(t.scale)

    @s
    @given(JSONISH)
    def factorized_metadata(meta: object) -> None:
        record = {"format": "factorized", "layers": meta} if isinstance(meta, dict) else meta
        for raw in (json.dumps(meta), json.dumps(record)):
            try:
                layers = factorized_layers({"lorasurgeon": raw})
            except LorasurgeonError:
                continue
            assert isinstance(layers, dict)

    return [shard_index, peft_configs, factorized_metadata]


OTHER_IDS = ["shard-index", "peft-config", "factorized-metadata"]


@pytest.mark.parametrize("prop", _other_properties(FAST), ids=OTHER_IDS)
def test_other_parsers(prop: Callable) -> None:
    prop()


@pytest.mark.slow
@pytest.mark.parametrize("prop", _other_properties(SLOW), ids=OTHER_IDS)
def test_other_parsers_long(prop: Callable) -> None:
    prop()


def test_surrogate_strategy_reaches_the_parser() -> None:
    """Guard: the name strategy really produces lone surrogates, written as \\udxxx escapes."""
    raw = json.dumps({"\udcff": 1}).encode("utf-8", "surrogatepass")
    assert b"\\udcff" in raw
