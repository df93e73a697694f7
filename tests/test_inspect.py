"""inspect, checked against independent computations and adapters made by peft itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.inspection import inspect_checkpoint, module_group
from tests.conftest import small_state_dict

runner = CliRunner()


def tiny_bert(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def run_json(*args: str) -> dict:
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def np_energy_rank(s: np.ndarray, t: float) -> int:
    c = np.cumsum(s.astype(np.float64) ** 2)
    c /= c[-1]
    return int(np.argmax(c >= t - 1e-12)) + 1


def test_json_totals_from_file(tmp_path: Path) -> None:
    sd = small_state_dict()
    p = tmp_path / "m.safetensors"
    save_file(sd, p)
    out = run_json("inspect", str(p))
    assert out["schema"] == "lorasurgeon.inspect/1"
    assert out["kind"] == "checkpoint"
    assert out["totals"]["params"] == sum(t.numel() for t in sd.values())
    assert out["totals"]["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert out["by_dtype"]["BF16"]["params"] == 24 * 16
    rows = {r["name"]: r for r in out["tensors"]}
    assert rows["conv.weight"]["shape"] == [8, 4, 3, 3] and rows["conv.weight"]["dtype"] == "F16"


def test_include_exclude_and_unmatched(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(small_state_dict(), p)
    out = run_json("inspect", str(p), "--include", "encoder.*", "--exclude", "*.bias")
    assert [r["name"] for r in out["tensors"]] == [
        "encoder.layer.0.attention.query.weight",
        "encoder.layer.1.ffn.weight",
    ]
    res = runner.invoke(app, ["inspect", str(p), "--include", "decoder.*"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: --include 'decoder.*' matches no tensor")


def test_spectrum_against_numpy(tmp_path: Path) -> None:
    sd = small_state_dict()
    p = tmp_path / "m.safetensors"
    save_file(sd, p)
    out = run_json("inspect", str(p), "--spectrum", "--rank", "3")
    rows = {r["name"]: r for r in out["spectrum"]}
    assert set(rows) == {"encoder.layer.0.attention.query.weight", "encoder.layer.1.ffn.weight", "conv.weight"}
    for name, row in rows.items():
        w = sd[name].float().numpy().reshape(sd[name].shape[0], -1).astype(np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        m, n = w.shape
        assert row["full_rank"] == min(m, n)
        assert row["sigma_max"] == pytest.approx(s[0], rel=1e-5)
        for t, key in ((0.9, "rank_90"), (0.95, "rank_95"), (0.99, "rank_99")):
            assert row[key] == np_energy_rank(s, t), (name, key)
        assert row["break_even"] == pytest.approx(m * n / (m + n), abs=0.01)
        assert row["energy_at_rank"] == pytest.approx((s[:3] ** 2).sum() / (s**2).sum(), rel=1e-5)
        p_ = s / s.sum()
        assert row["effective_rank"] == pytest.approx(math.exp(-(p_ * np.log(p_)).sum()), rel=1e-3)


def test_plot_writes_png(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(small_state_dict(), p)
    png = tmp_path / "s.png"
    res = runner.invoke(app, ["inspect", str(p), "--plot", str(png), "--quiet"])
    assert res.exit_code == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["inspect", str(p), "--plot", str(png)])
    assert res.exit_code == 1 and "output exists; pass --force" in res.stderr


def test_rank_needs_spectrum(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(small_state_dict(), p)
    res = runner.invoke(app, ["inspect", str(p), "--rank", "4"])
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: --rank needs --spectrum (it reports the energy kept at that rank)"


def test_peft_adapter_made_by_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_bert(tmp_path)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], rank_pattern={"value": 2},
        alpha_pattern={"value": 6}, use_rslora=True, init_lora_weights=False,
    )
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "ad")
    out = run_json("inspect", str(tmp_path / "ad"))
    assert out["kind"] == "peft"
    a = out["adapter"]
    assert a["use_rslora"] is True and a["ranks"] == [2, 4]
    rows = {r["module"]: r for r in a["rows"]}
    q = rows["encoder.layer.0.attention.self.query"]
    v = rows["encoder.layer.1.attention.self.value"]
    assert (q["rank"], q["alpha"], v["rank"], v["alpha"]) == (4, 8, 2, 6)
    assert q["scale"] == pytest.approx(8 / math.sqrt(4)) and v["scale"] == pytest.approx(6 / math.sqrt(2))
    # delta norm against peft's own delta weight
    for name, mod in pm.named_modules():
        if name.endswith("encoder.layer.0.attention.self.query") and hasattr(mod, "get_delta_weight"):
            ref = mod.get_delta_weight("default").norm().item()
            assert q["delta_norm"] == pytest.approx(ref, rel=1e-5)
            break
    else:
        raise AssertionError("peft layer not found")


def test_kohya_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "lora_unet_down_blocks_0_attn_to_q.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_down_blocks_0_attn_to_q.lora_up.weight": torch.randn(16, 4, generator=g),
        "lora_unet_down_blocks_0_attn_to_q.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 16, 3, 3, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(24, 8, 1, 1, generator=g),
    }
    p = tmp_path / "k.safetensors"
    save_file(sd, p, metadata={"ss_network_dim": "4"})
    out = run_json("inspect", str(p))
    assert out["kind"] == "kohya"
    rows = {r["module"]: r for r in out["adapter"]["rows"]}
    q = rows["lora_unet_down_blocks_0_attn_to_q"]
    assert (q["rank"], q["alpha"], q["scale"]) == (4, 2.0, 0.5)
    dense = 0.5 * sd["lora_unet_down_blocks_0_attn_to_q.lora_up.weight"] @ sd["lora_unet_down_blocks_0_attn_to_q.lora_down.weight"]
    assert q["delta_norm"] == pytest.approx(dense.norm().item(), rel=1e-5)
    c = rows["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert (c["rank"], c["alpha"], c["scale"], c["kernel"]) == (8, 8.0, 1.0, [3, 3])
    assert out["metadata"]["ss_network_dim"] == "4"


def test_adapter_selection_by_module_name_and_spectrum_of_the_update(tmp_path: Path) -> None:
    """-i/-x take the module names the adapter table prints; --spectrum is that of s·B·A, checked by numpy."""
    peft = pytest.importorskip("peft")
    model = tiny_bert(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                          use_rslora=True, init_lora_weights=False, modules_to_save=["pooler"])
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "ad")
    q0 = "encoder.layer.0.attention.self.query"
    out = run_json("inspect", str(tmp_path / "ad"), "-i", q0, "--spectrum", "--rank", "2")
    assert [r["name"] for r in out["tensors"]] == [f"base_model.model.{q0}.lora_A.weight", f"base_model.model.{q0}.lora_B.weight"]
    assert [r["module"] for r in out["adapter"]["rows"]] == [q0] and out["adapter"]["modules_to_save"] == []
    (row,) = out["spectrum"]
    layer = pm.base_model.model.encoder.layer[0].attention.self.query
    dense = layer.get_delta_weight("default").detach().double().numpy()
    s = np.linalg.svd(dense, compute_uv=False)[:4]
    assert (row["name"], row["shape"], row["full_rank"]) == (q0, [16, 16], 4)
    assert row["sigma_max"] == pytest.approx(s[0], rel=1e-6)
    assert row["energy_at_rank"] == pytest.approx((s[:2] ** 2).sum() / (s**2).sum(), rel=1e-6)
    assert row["rank_99"] == np_energy_rank(s, 0.99)
    assert row["break_even"] == pytest.approx(8.0)
    # exclude by module name drops that module's tensors; a glob over module names selects modules_to_save too
    out = run_json("inspect", str(tmp_path / "ad"), "-i", "*.value", "-i", "pooler.*", "-x", "encoder.layer.1.*")
    assert [r["module"] for r in out["adapter"]["rows"]] == ["encoder.layer.0.attention.self.value"]
    assert out["adapter"]["modules_to_save"] == ["pooler.dense.bias", "pooler.dense.weight"]
    v0 = "base_model.model.encoder.layer.0.attention.self.value"
    assert [r["name"] for r in out["tensors"]] == [f"{v0}.lora_A.weight", f"{v0}.lora_B.weight",
                                                   "base_model.model.pooler.dense.bias", "base_model.model.pooler.dense.weight"]
    res = runner.invoke(app, ["inspect", str(tmp_path / "ad"), "-i", "encoder.layer.9.*"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: --include 'encoder.layer.9.*' matches no tensor or module")


def test_kohya_conv_spectrum_is_that_of_the_scaled_update(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g)
    p = tmp_path / "k.safetensors"
    save_file({"lora_unet_conv.lora_down.weight": down, "lora_unet_conv.lora_up.weight": up,
               "lora_unet_conv.alpha": torch.tensor(1.5)}, p)
    (row,) = run_json("inspect", str(p), "-i", "lora_unet_conv", "--spectrum")["spectrum"]
    dense = 0.5 * up.reshape(6, 3).double().numpy() @ down.reshape(3, 36).double().numpy()
    s = np.linalg.svd(dense, compute_uv=False)[:3]
    assert (row["name"], row["shape"], row["full_rank"]) == ("lora_unet_conv", [6, 4, 3, 3], 3)
    assert row["sigma_max"] == pytest.approx(s[0], rel=1e-6)
    assert row["break_even"] == pytest.approx(6 * 36 / 42, abs=0.01)


def test_legacy_diffusers_tensors_belong_to_their_modules(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {f"unet.mid.attn1.processor.{p}_lora.{w}.weight": torch.randn(*(2, 8) if w == "down" else (8, 2), generator=g)
          for p in ("to_q", "to_out") for w in ("down", "up")}
    p = tmp_path / "legacy.safetensors"
    save_file(sd, p)
    out = run_json("inspect", str(p), "-i", "unet.mid.attn1.to_out.0")
    assert out["kind"] == "diffusers-legacy"
    assert [r["module"] for r in out["adapter"]["rows"]] == ["unet.mid.attn1.to_out.0"]
    assert [r["name"] for r in out["tensors"]] == ["unet.mid.attn1.processor.to_out_lora.down.weight",
                                                   "unet.mid.attn1.processor.to_out_lora.up.weight"]


def test_loha_is_named(tmp_path: Path) -> None:
    p = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, p)
    out = run_json("inspect", str(p))
    assert out["kind"] == "non-lora:LoHa (LyCORIS)"


def test_module_group() -> None:
    assert module_group("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert module_group("embeddings.word_embeddings.weight") == "embeddings"
    assert module_group("lora_unet_down_blocks_0_attn.alpha") == "lora_unet_down_blocks_0"


def test_library_call_matches_cli(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(small_state_dict(), p)
    r = inspect_checkpoint(p)
    assert r.to_json() == run_json("inspect", str(p))


def test_spectrum_of_a_factorized_layer_is_that_of_u_times_v(tmp_path: Path) -> None:
    """It used to list weight_u and weight_v apart, each with its own (meaningless) spectrum."""
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(12, 20, generator=g), "b.weight": torch.randn(6, 6, generator=g)}, tmp_path / "m.safetensors")
    run_json("factorize", str(tmp_path / "m.safetensors"), "--rank", "3", "--include", "a", "-o", str(tmp_path / "f.safetensors"))
    from safetensors.torch import load_file

    f = load_file(tmp_path / "f.safetensors")
    S = torch.linalg.svdvals(f["a.weight_u"].double() @ f["a.weight_v"].double())[:3]
    for include in ([], ["--include", "a.weight_u"]):
        out = run_json("inspect", str(tmp_path / "f.safetensors"), "--spectrum", "--rank", "2", *include)
        rows = {r["name"]: r for r in out["spectrum"]}
        assert sorted(rows) == (["a.weight"] if include else ["a.weight", "b.weight"])
        a = rows["a.weight"]
        assert a["shape"] == [12, 20] and a["full_rank"] == 3 and a["break_even"] == round(12 * 20 / 32, 2)
        assert a["sigma_max"] == pytest.approx(float(S[0]), rel=1e-9)
        assert a["energy_at_rank"] == pytest.approx(float((S[:2] ** 2).sum() / (S**2).sum()), rel=1e-9)
