"""The library as a Python caller uses it: results, and the caller's state left as it was."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import lorasurgeon as ls
from lorasurgeon.errors import InvalidOptionError
from lorasurgeon.ops.ranks import RankRule
from lorasurgeon.zoo import digits_cnn_weights

ARCH = "lorasurgeon.zoo:digits_cnn"
transformers = pytest.importorskip("transformers")


def _tiny_bert_folder(tmp_path: Path) -> Path:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def _next_draw(seed: int, call) -> float:
    torch.manual_seed(seed)
    call()
    return float(torch.rand(1))


def test_calls_leave_the_callers_random_state_alone(tmp_path: Path) -> None:
    bert = _tiny_bert_folder(tmp_path)
    calls = {
        "load_model with a new head": lambda: ls.load_model(bert, num_labels=3),
        "export_model": lambda: ls.export_model(digits_cnn_weights(), tmp_path / "e.onnx", arch=ARCH, force=True),
        "attach_lora": lambda: ls.attach_lora(digits_cnn_weights(), "digits", tmp_path / "a", arch=ARCH, rank=2, limit=64,
                                              opts=ls.TrainOptions(epochs=1, batch_size=32), force=True),
        "factorize_checkpoint --arch": lambda: ls.factorize_checkpoint(
            digits_cnn_weights(), None, rule=RankRule("rank", 8), include="conv*", arch=ARCH, dry_run=True),
        "factorize_checkpoint --arch --calibration": lambda: ls.factorize_checkpoint(
            digits_cnn_weights(), tmp_path / "c.safetensors", rule=RankRule("rank", 8), include="conv*", arch=ARCH, force=True,
            calibration=ls.CalibrationOptions("digits", method="svd-llm", samples=32, heldout=16)),
    }
    for name, call in calls.items():
        torch.manual_seed(1)
        expected = float(torch.rand(1))
        assert _next_draw(1, call) == expected, name  # the caller's stream continues as if nothing ran


def test_load_model_restores_transformers_settings_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    bert = _tiny_bert_folder(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    ls.load_model(bert)
    assert "HF_HUB_OFFLINE" not in os.environ
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()


def test_train_options_and_an_ignored_sigterm_stay_as_given(tmp_path: Path) -> None:
    opts = ls.TrainOptions(epochs=1, batch_size=32, device="auto")
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ls.attach_lora(digits_cnn_weights(), "digits", tmp_path / "a", arch=ARCH, rank=2, limit=64, opts=opts)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the default: a handler only while writing, then back
        ls.attach_lora(digits_cnn_weights(), "digits", tmp_path / "b", arch=ARCH, rank=2, limit=64, opts=opts)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert opts.device == "auto"


def test_to_json_is_the_cli_json(tmp_path: Path) -> None:
    """Figures not measured (a dry run's errors) are None, as the CLI prints null: strict JSON."""
    res = ls.factorize_checkpoint(digits_cnn_weights(), None, rule=RankRule("rank", 2), include=["conv*"], dry_run=True)
    assert math.isnan(res.layers[0].rel_error)  # the dataclass keeps NaN (a float field) ...
    d = res.to_json()
    json.dumps(d, allow_nan=False)
    assert d["layers"][0]["rel_error"] is None and d["layers"][0]["energy_kept"] is None  # ... its JSON says null


def test_library_argument_shapes(tmp_path: Path) -> None:
    w = digits_cnn_weights()
    # a single pattern is one pattern, not its characters
    out = ls.inspect_checkpoint(w, include="conv*")
    assert out.tensors and all(t.name.startswith("conv") for t in out.tensors)
    with pytest.raises(InvalidOptionError, match="rule must be a RankRule, got tuple"):
        ls.factorize_checkpoint(w, None, rule=ls.make_rule(rank=2), dry_run=True)
    with pytest.raises(InvalidOptionError, match="--format must be peft, kohya or diffusers, got 'bogus'"):
        ls.resize_adapter(tmp_path / "nothing", None, RankRule("rank", 1), fmt="bogus", dry_run=True)
    # arch given once serves the calibration too
    res = ls.factorize_checkpoint(w, None, rule=RankRule("rank", 4), include=["conv*"], arch=ARCH, dry_run=True,
                                  calibration=ls.CalibrationOptions(data="digits", samples=32, heldout=0))
    assert res.layers
    with pytest.raises(InvalidOptionError, match="--device must be cpu, cuda or auto, got 'bogus'"):
        ls.load_model(w, arch=ARCH, device="bogus")


def test_factorize_module_equals_factorize_on_the_file(tmp_path: Path) -> None:
    from lorasurgeon.nn.layers import LowRankConv2d

    model = ls.load_model(digits_cnn_weights(), arch=ARCH).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    low, reports = ls.factorize_module(model, RankRule("rank", 8), include="conv*")
    ls.factorize_checkpoint(digits_cnn_weights(), tmp_path / "f.safetensors", rule=RankRule("rank", 8), include=["conv*"],
                            arch=ARCH)
    ref = ls.load_model(tmp_path / "f.safetensors", arch=ARCH).model.state_dict()
    got = low.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert isinstance(low.conv2, LowRankConv2d) and not isinstance(model.conv2, LowRankConv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    conv1 = next(r for r in reports if r.module == "conv1")  # 32×9: rank 8 saves nothing, stays dense
    assert conv1.rank is None and conv1.status.startswith("dense")


def test_merge_state_dict_equals_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    bert = _tiny_bert_folder(tmp_path)
    torch.manual_seed(3)
    pm = peft.get_peft_model(transformers.BertModel.from_pretrained(bert),
                             peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"], lora_bias=True,
                                             init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    ref = pm.merge_and_unload().state_dict()
    base = transformers.BertModel.from_pretrained(bert).state_dict()
    before = {k: v.clone() for k, v in base.items()}
    got = ls.merge_state_dict(base, ls.read_adapter(tmp_path / "ad"))
    assert set(got) == set(ref)
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-6
    assert all(torch.equal(base[k], before[k]) for k in base)
    half = ls.merge_state_dict(base, tmp_path / "ad", weights=0.5)  # a path, and one weight, work too
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(half[q] - base[q], 0.5 * (got[q] - base[q]), atol=1e-6)


def test_the_library_page_runs(tmp_path: Path) -> None:
    """docs/library.md's example runs as written."""
    import re
    import subprocess
    import sys

    page = (Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- runnable-python -->\s*```python\n(.*?)```", page, re.S)
    assert blocks
    for code in blocks:
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "MatchError: --include 'decoder.*' matches no tensor" in p.stdout


def test_merge_state_dict_refuses_two_different_replacements(tmp_path: Path) -> None:
    from lorasurgeon.errors import UnsupportedError
    from lorasurgeon.io.adapters import Adapter, LoraTarget

    g = torch.Generator().manual_seed(0)
    state = {"l.weight": torch.randn(4, 4, generator=g), "head.weight": torch.zeros(2, 4)}
    t = LoraTarget("l", torch.randn(1, 4, generator=g), torch.randn(4, 1, generator=g), 1.0, 1.0)
    a = Adapter("peft", {"l": t}, {"head.weight": torch.ones(2, 4)})
    b = Adapter("peft", {"l": t}, {"head.weight": torch.full((2, 4), 2.0)})
    assert torch.equal(ls.merge_state_dict(state, [a, a])["head.weight"], torch.ones(2, 4))  # the same tensor twice: fine
    with pytest.raises(UnsupportedError, match="adapter 1 and adapter 2 both replace 'head.weight' \\(modules_to_save\\) with different"):
        ls.merge_state_dict(state, [a, b])


def test_factorize_module_keeps_layers_whose_weight_is_read_directly_working() -> None:
    # nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward, and
    # nn.TransformerEncoderLayer's inference fast path hands linear1/linear2's weights to a fused
    # kernel: out_proj stays dense, and the factorized FFN makes the layer take its plain path
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                      enable_nested_tensor=False).eval()
    small, reports = ls.factorize_module(enc, RankRule("rank", 4))
    status = {r.module: r.status for r in reports}
    assert status["layers.0.self_attn.out_proj"] == "dense: nn.MultiheadAttention reads this out_proj's weight directly"
    assert status["layers.1.linear1"] == "factorized"
    x = torch.randn(2, 5, 32)
    plain = small(x)  # with gradients on, the plain path: each layer called
    with torch.no_grad():
        fast = small(x)  # without, where the fused kernel would have been taken
    assert torch.allclose(plain, fast, atol=1e-6)  # (the attention itself may still take its own fused path)
    # the reference: the same factors' products as dense Linear weights in the original model
    ref = __import__("copy").deepcopy(enc)
    with torch.no_grad():
        for n, m in small.named_modules():
            if hasattr(m, "dense_weight"):
                ref.get_submodule(n).weight.copy_(m.dense_weight())
        assert torch.allclose(ref(x), fast, atol=1e-5)
    with pytest.raises(TypeError, match=r"linear\(\) was given a factorized layer's .weight, which is two factors"):
        torch.nn.functional.linear(x, small.layers[0].linear1.weight)


def test_factorize_module_shared_layers_min_params_and_nothing_to_factorize() -> None:
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(20, 20)
            self.b = self.a
            self.c = torch.nn.Linear(20, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    model = Shared()
    small, reports = ls.factorize_module(model, RankRule("rank", 3), min_params=100)
    assert small.a is small.b and type(small.a).__name__ == "LowRankLinear"  # shared, factorized once
    assert [(r.module, r.status) for r in reports] == [("a", "factorized"), ("c", "dense: 80 parameters < min_params 100")]
    x = torch.randn(3, 20)
    d = small.a.dense_weight()
    assert torch.allclose(small(x), model.c(torch.nn.functional.linear(torch.nn.functional.linear(x, d, model.a.bias), d,
                                                                       model.a.bias)), atol=1e-5)
    only_b, reports = ls.factorize_module(model, RankRule("rank", 3), include="b.weight")
    assert only_b.a is only_b.b and [r.module for r in reports] == ["a"]
    not_b, reports = ls.factorize_module(model, RankRule("rank", 3), exclude="b.weight")  # one layer: kept dense
    assert not_b.a is not_b.b and type(not_b.a).__name__ == "Linear" and [r.module for r in reports] == ["c"]
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=8))
    with pytest.raises(ls.MatchError, match=r"^the model has no nn.Linear or nn.Conv2d \(groups 1\) layer to "
                       r"factorize; its 4 GPT-2 Conv1D layers \(e.g. 'h.0.attn.c_attn'\) store their weights transposed"):
        ls.factorize_module(gpt2, RankRule("rank", 4))


def test_merge_state_dict_copies_modules_to_save_in_the_states_dtype() -> None:
    from lorasurgeon.io.adapters import Adapter, LoraTarget

    t = LoraTarget("fc", torch.randn(2, 4), torch.randn(3, 2), 2.0, 1.0)
    head, new = torch.randn(2, 3), torch.randn(5)
    ad = Adapter("peft", {"fc": t}, modules_to_save={"head.weight": head, "extra.bias": new})
    state = {"fc.weight": torch.zeros(3, 4, dtype=torch.bfloat16), "head.weight": torch.zeros(2, 3, dtype=torch.bfloat16)}
    out = ls.merge_state_dict(state, ad)
    assert out["head.weight"].dtype == torch.bfloat16 and torch.equal(out["head.weight"], head.to(torch.bfloat16))
    assert out["extra.bias"].dtype == torch.float32 and torch.equal(out["extra.bias"], new)
    assert out["extra.bias"].data_ptr() != new.data_ptr()
    out["extra.bias"].add_(1)
    assert torch.equal(ad.modules_to_save["extra.bias"], new) and not torch.equal(new, out["extra.bias"])


def test_library_options_of_the_wrong_type_are_option_errors(tmp_path: Path) -> None:
    from lorasurgeon.io.adapters import Adapter, LoraTarget, write_adapter

    with pytest.raises(InvalidOptionError, match=r"^--batch-size must be a whole number, got 16.5$"):
        ls.attach_lora(digits_cnn_weights(), "digits", tmp_path / "a", arch=ARCH, limit=64,
                       opts=ls.TrainOptions(epochs=1, batch_size=16.5))  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match=r"^--lr must be a number, got '1e-3'$"):
        ls.TrainOptions(lr="1e-3").validate()  # type: ignore[arg-type]
    ad = Adapter("peft", {"fc": LoraTarget("fc", torch.randn(2, 4), torch.randn(3, 2), 2.0, 1.0)})
    with pytest.raises(InvalidOptionError, match="unknown adapter format 'lycoris'; choose peft, kohya or diffusers"):
        write_adapter(ad, tmp_path / "x.safetensors", "lycoris")
    assert not (tmp_path / "a").exists() and not (tmp_path / "x.safetensors").exists()


def _delta(t) -> torch.Tensor:  # noqa: ANN001 - a LoraTarget
    return t.scale * (t.B.reshape(t.B.shape[0], -1).double() @ t.A.reshape(t.A.shape[0], -1).double())


def _same_adapter(a, b) -> None:  # noqa: ANN001
    assert a.targets.keys() == b.targets.keys()
    for m in a.targets:
        ta, tb = a.targets[m], b.targets[m]
        assert torch.equal(ta.A, tb.A) and torch.equal(ta.B, tb.B) and ta.scale == tb.scale, m


def test_compose_resize_and_extract_in_memory(tmp_path: Path) -> None:
    """out=None composes, re-ranks and extracts in memory: ``result.adapter`` is what the same
    call with an output writes (read back, bit for bit); Adapter objects go in as they are and
    are left unchanged; nothing is written."""
    peft = pytest.importorskip("peft")
    bert = _tiny_bert_folder(tmp_path)
    paths = []
    for i, (r, alpha) in enumerate(((2, 4), (3, 9))):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(transformers.BertModel.from_pretrained(bert),
                                 peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"],
                                                 init_lora_weights=False))
        pm.save_pretrained(tmp_path / f"ad{i}")
        paths.append(tmp_path / f"ad{i}")
    held = [ls.read_adapter(p) for p in paths]
    kept = [{m: (t.A.clone(), t.B.clone()) for m, t in ad.targets.items()} for ad in held]
    before = sorted(os.listdir(tmp_path))

    mem = ls.compose_adapters(held, None, "svd", weights=[1.0, -0.5], rank=3)
    assert mem.output is None and "adapter" not in mem.to_json()
    json.dumps(mem.to_json(), allow_nan=False)
    for m, t in mem.adapter.targets.items():  # the best rank-3 approximation of the exact weighted sum
        want = _delta(held[0].targets[m]) - 0.5 * _delta(held[1].targets[m])
        best = torch.linalg.svd(want)
        ref = (best.U[:, :3] * best.S[:3]) @ best.Vh[:3]
        assert torch.allclose(_delta(t), ref, atol=1e-5), m
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    on_disk = ls.compose_adapters(paths, tmp_path / "c", "svd", weights=[1.0, -0.5], rank=3)
    _same_adapter(mem.adapter, ls.read_adapter(tmp_path / "c"))
    _same_adapter(mem.adapter, on_disk.adapter)
    assert mem.inputs == [str(p) for p in paths]  # held adapters are named by their source
    cat = ls.compose_adapters(held[0], None, "cat", weights=2.0)  # one Adapter, not a list, works too
    assert cat.inputs == [str(paths[0])] and torch.allclose(
        _delta(next(iter(cat.adapter.targets.values()))), 2 * _delta(next(iter(held[0].targets.values()))), atol=1e-6)
    with pytest.raises(InvalidOptionError, match="Adapter objects are composed in memory: pass out=None"):
        ls.compose_adapters(held, tmp_path / "x", "cat")
    # what a write refuses, the in-memory call refuses alike (a diffusers file holds no modules_to_save)
    from dataclasses import replace

    from lorasurgeon.errors import UnsupportedError

    with_head = replace(held[0], modules_to_save={"pooler.dense.weight": torch.zeros(16, 16)})
    for call in (lambda: ls.compose_adapters([with_head], None, "cat", fmt="diffusers", component="text_encoder"),
                 lambda: ls.resize_adapter(with_head, None, RankRule("rank", 1), fmt="diffusers", component="text_encoder")):
        with pytest.raises(UnsupportedError, match="modules_to_save"):
            call()

    small = ls.resize_adapter(held[1], None, RankRule("rank", 1))
    assert small.output is None and {t.rank for t in small.adapter.targets.values()} == {1}
    assert small.adapter.modules_to_save is not held[1].modules_to_save and small.adapter.config is not held[1].config
    as_kohya = ls.resize_adapter(held[1], None, RankRule("rank", 1), fmt="kohya", component="text_encoder")
    assert as_kohya.adapter.format == "kohya"  # the layout asked for, as the written file reads back
    ls.resize_adapter(paths[1], tmp_path / "r", RankRule("rank", 1))
    _same_adapter(small.adapter, ls.read_adapter(tmp_path / "r"))
    with pytest.raises(InvalidOptionError, match="an Adapter object is resized in memory"):
        ls.resize_adapter(held[1], tmp_path / "y", RankRule("rank", 1))
    for ad, k in zip(held, kept, strict=True):  # the caller's adapters are untouched
        assert all(torch.equal(t.A, k[m][0]) and torch.equal(t.B, k[m][1]) for m, t in ad.targets.items())

    base = transformers.BertModel.from_pretrained(bert).state_dict()
    tuned = ls.merge_state_dict(base, held[0])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "b.safetensors")
    save_file({k: v.contiguous() for k, v in tuned.items()}, tmp_path / "t.safetensors")
    ex = ls.extract_adapter(tmp_path / "b.safetensors", tmp_path / "t.safetensors", None, RankRule("rank", 2))
    assert ex.output is None and not (tmp_path / "e").exists()
    ls.extract_adapter(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "e", RankRule("rank", 2))
    _same_adapter(ex.adapter, ls.read_adapter(tmp_path / "e"))
    for m, t in ex.adapter.targets.items():  # rank 2 recovers the rank-2 update (to fp32 rounding of W' − W)
        assert torch.allclose(_delta(t), _delta(held[0].targets[m]), atol=1e-5), m
