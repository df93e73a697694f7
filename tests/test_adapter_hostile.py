"""Malformed and adversarial adapter files (found by a hostile-input trial): each is one line and
exit 1, nothing written, never a silent misread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app

runner = CliRunner()
D, U = torch.randn(2, 8), torch.randn(8, 2)
KD = {"lora_unet_x.lora_down.weight": D, "lora_unet_x.lora_up.weight": U}


def _inspect_fails(tmp_path: Path, state: dict, message: str, metadata: dict | None = None) -> None:
    p = tmp_path / "a.safetensors"
    save_file(state, p, metadata=metadata)
    res = runner.invoke(app, ["inspect", str(p)])
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("state, metadata, message", [
    # another layout's factors, or any whole tensor, in a kohya file nobody marked as ours
    ({**KD, "unet.y.lora_A.weight": D.clone(), "unet.y.lora_B.weight": U.clone()}, None, "tensor(s) that are not kohya LoRA, e.g. 'unet.y.lora_A.weight'"),
    ({**KD, "random.tensor": torch.ones(3)}, None, "tensor(s) that are not kohya LoRA, e.g. 'random.tensor'"),
    ({**KD, "lora_unet_z.alpha": torch.tensor(1.0)}, None, "alpha for 'lora_unet_z', which has no lora_down / lora_up"),
    ({**KD, "lora_unet_x.alpha": torch.tensor(True)}, None, "alpha must be one finite number"),
    ({**KD, "lora_unet_x.dora_scale": torch.rand(2, 4)}, None, "dora_scale has 8 values [2, 4] for 8 output rows"),
    ({"lora_unet_x.lora_down.weight": torch.randn(0, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 0)}, None,
     "have an empty dimension"),
    ({"lora_unet_x.lora_down.weight": torch.randn(2, 4, 3, 3), "lora_unet_x.lora_up.weight": torch.randn(4, 2, 3, 3)}, None,
     "the up factor (4, 2, 3, 3) must be a 1×1 conv"),
    ({"unet.x.lora_A.weight": D, "unet.x.lora_B.weight": U, "unet.x.lora_B.bias": torch.randn(7)}, None,
     "its LoRA bias (7,) must hold one value per output row (8)"),
    ({"unet.x.lora_A.weight": D, "unet.x.lora_B.weight": U}, {"lora_adapter_metadata": "{not json"},
     "lora_adapter_metadata is not valid JSON"),
    ({"unet.x.lora_A.weight": D, "unet.x.lora_B.weight": U},
     {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4, "unet.use_rslora": "false"})},
     "lora_adapter_metadata for 'unet': 'use_rslora' must be true or false, got 'false'"),
    ({"unet.a.processor.to_q_lora.down.weight": D, "unet.a.processor.to_q_lora.up.weight": U,
      "unet.a.to_q.lora_A.weight": D.clone(), "unet.a.to_q.lora_B.weight": U.clone()}, None, "two layouts in one file"),
])
def test_malformed_adapters_are_one_line_errors(tmp_path: Path, state: dict, metadata: dict | None, message: str) -> None:
    _inspect_fails(tmp_path, state, message, metadata)


def test_fp8_factors_are_named(tmp_path: Path) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no fp8 in this torch")
    _inspect_fails(tmp_path, {"lora_unet_x.lora_down.weight": D.to(torch.float8_e4m3fn), "lora_unet_x.lora_up.weight": U},
                   "its A tensor is float8_e4m3fn; LoRA tensors must be fp16, bf16, fp32 or fp64")


def test_generic_kohya_stems_keep_their_name(tmp_path: Path) -> None:
    """lora_down_attn_to_k became lora_lora_down_attn_to_k on every kohya write."""
    save_file({"lora_down_attn_to_k.lora_down.weight": D, "lora_down_attn_to_k.lora_up.weight": U}, tmp_path / "g.safetensors")
    res = runner.invoke(app, ["resize", str(tmp_path / "g.safetensors"), "--rank", "1", "-o", str(tmp_path / "r.safetensors")])
    assert res.exit_code == 0, res.stderr
    assert sorted(load_file(tmp_path / "r.safetensors")) == ["lora_down_attn_to_k.alpha", "lora_down_attn_to_k.lora_down.weight",
                                                             "lora_down_attn_to_k.lora_up.weight"]


def test_one_module_claimed_by_a_part_and_a_partless_stem(tmp_path: Path) -> None:
    """lora_unet_x and lycoris_x both mapped to x (the file also held a text-encoder layer, so
    names were prefixed apart) and merge added both deltas."""
    save_file({"down.attn.to_q.weight": torch.randn(8, 8)}, tmp_path / "b.safetensors")
    save_file({"lora_unet_down_attn_to_q.lora_down.weight": D, "lora_unet_down_attn_to_q.lora_up.weight": U,
               "lycoris_down_attn_to_q.lora_down.weight": D.clone(), "lycoris_down_attn_to_q.lora_up.weight": U.clone(),
               "lora_te1_q.lora_down.weight": D.clone(), "lora_te1_q.lora_up.weight": U.clone()}, tmp_path / "k.safetensors")
    res = runner.invoke(app, ["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "k.safetensors"), "-o",
                              str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and "both map to the module 'down.attn.to_q'" in res.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_component_is_checked_even_when_everything_fits(tmp_path: Path) -> None:
    save_file({"x.weight": torch.randn(8, 8)}, tmp_path / "b.safetensors")
    save_file(KD, tmp_path / "k.safetensors")
    res = runner.invoke(app, ["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "k.safetensors"), "--component",
                              "text_encoder", "-o", str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and res.stderr.strip().endswith("k.safetensors has no LoRA for --component text_encoder; it has unet")


def test_an_empty_output_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-o "$UNSET" --force replaced the working folder (pathlib reads "" as ".")."""
    monkeypatch.chdir(tmp_path)
    save_file(KD, tmp_path / "k.safetensors")
    (tmp_path / "precious.txt").write_text("x")
    res = runner.invoke(app, ["resize", "k.safetensors", "--rank", "1", "--format", "peft", "-o", "", "--force"])
    assert res.exit_code == 1 and res.stderr == "error: the output path is empty\n"
    assert (tmp_path / "precious.txt").read_text() == "x"


def test_convert_with_base_checks_the_layers_fit(tmp_path: Path) -> None:
    """convert --base mapped names only: factors 7 wide for an 8×6 weight came out as a PEFT adapter."""
    save_file({"x.weight": torch.randn(8, 6)}, tmp_path / "b.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 7), "lora_unet_x.lora_up.weight": U}, tmp_path / "k.safetensors")
    res = runner.invoke(app, ["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--base", str(tmp_path / "b.safetensors"),
                              "-o", str(tmp_path / "p")])
    assert res.exit_code == 1 and res.stderr.strip().endswith("1 layer(s) do not fit the base b.safetensors: x ([8, 7] vs [8, 6])")
    assert not (tmp_path / "p").exists()


def test_a_bare_peft_file_has_scale_one_and_metadata_must_match_the_tensors(tmp_path: Path) -> None:
    """A PEFT file without adapter_config.json was read at PEFT's default alpha 8 over its own rank
    (x4 for rank 2); diffusers metadata whose r contradicted the factors was accepted."""
    from lorasurgeon.io.adapters import read_adapter

    save_file({"base_model.model.x.lora_A.weight": D, "base_model.model.x.lora_B.weight": U}, tmp_path / "p.safetensors")
    t = read_adapter(tmp_path / "p.safetensors").targets["x"]
    assert (t.alpha, t.scale) == (2.0, 1.0)
    _inspect_fails(tmp_path, {"unet.x.lora_A.weight": D, "unet.x.lora_B.weight": U},
                   "module 'unet.x' has rank 2 but lora_adapter_metadata says r=99",
                   {"lora_adapter_metadata": json.dumps({"unet.r": 99, "unet.lora_alpha": 4})})


@pytest.mark.parametrize("state, name", [
    # as lycoris-lora 4.1 saves them: no LoRA factor at all, so nothing marked them as adapters
    ({"lora_unet_x.weight": torch.randn(8), "lora_unet_x.on_input": torch.tensor(False)}, "(IA)³ (LyCORIS)"),
    ({"lora_unet_x.a1.weight": D, "lora_unet_x.a2.weight": U, "lora_unet_x.b1.weight": D.clone(),
      "lora_unet_x.b2.weight": U.clone(), "lora_unet_x.alpha": torch.tensor(2.0)}, "GLoRA (LyCORIS)"),
    ({"lora_unet_x.lambda_layer": torch.randn(1, 2), "lora_unet_x.q_layer.weight": D,
      "lora_unet_x.p_layer.weight": U}, "T-LoRA (LyCORIS)"),
    ({"lora_x.weight": torch.randn(8), "lora_x.on_input": torch.tensor(False)}, "(IA)³ (LyCORIS)"),  # generic prefix
])
def test_lycoris_layouts_without_lora_factors_are_named(tmp_path: Path, state: dict, name: str) -> None:
    p = tmp_path / "a.safetensors"
    save_file(state, p)
    res = runner.invoke(app, ["inspect", str(p), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["kind"] == f"non-lora:{name}", res.stdout
    save_file({"x.weight": torch.randn(8, 8)}, tmp_path / "base.safetensors")
    res = runner.invoke(app, ["merge", str(tmp_path / "base.safetensors"), str(p), "-o", str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and res.stderr.strip() == (f"error: {p}: {name} adapter: only LoRA (and LoCon) layouts "
                                                         "are supported"), res.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_a_dylora_file_merges_as_its_loaders_read_it_with_a_warning(tmp_path: Path) -> None:
    save_file({"x.weight": torch.zeros(8, 8)}, tmp_path / "base.safetensors")
    save_file({**KD, "lora_unet_x.alpha": torch.tensor(4)}, tmp_path / "d.safetensors",
              metadata={"ss_network_args": json.dumps({"algo": "dylora", "block_size": "1"})})
    res = runner.invoke(app, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "d.safetensors"), "-o",
                              str(tmp_path / "m.safetensors")])
    assert res.exit_code == 0 and ("warning: d.safetensors was trained as DyLoRA (ss_network_args); it is merged as "
                                   "LoCon at alpha/r, as LyCORIS's and kohya's loaders read it") in res.stderr
    assert torch.allclose(load_file(tmp_path / "m.safetensors")["x.weight"], 2.0 * U @ D)
