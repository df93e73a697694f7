"""Adapters for several parts of a diffusion pipeline (kohya ``lora_unet_`` / ``lora_te_`` /
``lora_te1_`` / ``lora_te2_``, diffusers ``unet.`` / ``text_encoder.``), and the LyCORIS and
diffusers variants that must be read right or refused by name. Expected merges are computed
here in fp64 from the file's tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.io.adapters import read_adapter

runner = CliRunner()
Q = "text_model.encoder.layers.0.self_attn.q_proj"
FC1 = "text_model.encoder.layers.0.mlp.fc1"


def _encoder(path: Path, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"{Q}.weight": torch.randn(width, width, generator=g), f"{Q}.bias": torch.randn(width, generator=g),
          f"{FC1}.weight": torch.randn(2 * width, width, generator=g)}
    save_file(sd, path)
    return sd


def _kohya_pair(sd: dict[str, torch.Tensor], prefix: str, module: str, out: int, inn: int, rank: int, alpha: float,
                g: torch.Generator) -> None:
    stem = prefix + module.replace(".", "_")
    sd[f"{stem}.lora_down.weight"] = torch.randn(rank, inn, generator=g)
    sd[f"{stem}.lora_up.weight"] = torch.randn(out, rank, generator=g)
    sd[f"{stem}.alpha"] = torch.tensor(alpha)


def _kohya(path: Path, widths: dict[str, int], seed: int = 1) -> dict[str, torch.Tensor]:
    """A kohya file with LoRA on q_proj and fc1 of each text encoder prefix given (prefix -> width)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for prefix, w in widths.items():
        _kohya_pair(sd, prefix, Q, w, w, 2, 4.0, g)
        _kohya_pair(sd, prefix, FC1, 2 * w, w, 2, 1.0, g)
    save_file(sd, path)
    return sd


def _expected(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for mod in (Q, FC1):
        stem = prefix + mod.replace(".", "_")
        up, down = lora[f"{stem}.lora_up.weight"].double(), lora[f"{stem}.lora_down.weight"].double()
        s = float(lora[f"{stem}.alpha"]) / down.shape[0]
        out[f"{mod}.weight"] = (base[f"{mod}.weight"].double() + s * up @ down).float()
    return out


def run(*args: str, code: int = 0):
    res = runner.invoke(app, [*args])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return res


def test_sdxl_text_encoders_of_one_width_need_component(tmp_path: Path) -> None:
    """Both encoders' LoRA fit the base by name and shape: merging used to put text_encoder_2's
    LoRA into text_encoder, silently. Now the user must say which encoder the base is."""
    base = _encoder(tmp_path / "te.safetensors", 8, 0)
    lora = _kohya(tmp_path / "sdxl.safetensors", {"lora_te1_": 8, "lora_te2_": 8})
    res = run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "sdxl.safetensors"), "-o", str(tmp_path / "m.safetensors"),
              code=1)
    assert res.stderr == (f"error: {tmp_path / 'sdxl.safetensors'}: sdxl.safetensors holds LoRA for text_encoder, "
                          "text_encoder_2, and each fits the base's weights (SDXL's two text encoders have layers of the "
                          "same names): say which one the base is with --component (text_encoder or text_encoder_2)\n")
    assert not (tmp_path / "m.safetensors").exists()
    for comp, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        out = tmp_path / f"{comp}.safetensors"
        res = run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "sdxl.safetensors"), "-o", str(out),
                  "--component", comp, "--json")
        other = "text_encoder_2" if comp == "text_encoder" else "text_encoder"
        assert json.loads(res.stdout)["extra"] == {"skipped_components": {f"sdxl.safetensors: {other}": 2}}
        got, want = load_file(out), _expected(base, lora, prefix)
        for n, t in want.items():
            assert torch.allclose(got[n], t, atol=1e-5), (comp, n)
        assert torch.equal(got[f"{Q}.bias"], base[f"{Q}.bias"])


def test_sdxl_text_encoders_of_two_widths_pick_themselves(tmp_path: Path) -> None:
    """SDXL's encoders differ in width: each base takes the LoRA that fits it, the other part is skipped."""
    lora = _kohya(tmp_path / "sdxl.safetensors", {"lora_te1_": 8, "lora_te2_": 12})
    for name, width, prefix in (("te1", 8, "lora_te1_"), ("te2", 12, "lora_te2_")):
        base = _encoder(tmp_path / f"{name}.safetensors", width, width)
        out = tmp_path / f"{name}-m.safetensors"
        run("merge", str(tmp_path / f"{name}.safetensors"), str(tmp_path / "sdxl.safetensors"), "-o", str(out))
        got, want = load_file(out), _expected(base, lora, prefix)
        for n, t in want.items():
            assert torch.allclose(got[n], t, atol=1e-5), (name, n)


def test_merge_rejects_an_unknown_or_absent_component(tmp_path: Path) -> None:
    _encoder(tmp_path / "te.safetensors", 8, 0)
    _kohya(tmp_path / "sdxl.safetensors", {"lora_te1_": 8, "lora_te2_": 8})
    res = run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "sdxl.safetensors"), "-o", str(tmp_path / "m.safetensors"),
              "--component", "unet", code=1)
    assert res.stderr.endswith("sdxl.safetensors has no LoRA for --component unet; it has text_encoder, text_encoder_2\n")
    res = run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "sdxl.safetensors"), "-o", str(tmp_path / "m.safetensors"),
              "--component", "vae", code=1)
    assert res.stderr.endswith("--component must be one of unet, text_encoder, text_encoder_2, transformer, prior, decoder, "
                               "got 'vae'\n")


def test_sd1_kohya_text_encoder_converts_to_diffusers_text_encoder_and_back_to_lora_te(tmp_path: Path) -> None:
    """kohya -> diffusers used to put the text encoder's LoRA under unet.; diffusers -> kohya used
    lora_te1_ (SDXL's) for an SD 1.x text encoder, whose kohya prefix is lora_te_."""
    _encoder(tmp_path / "te.safetensors", 8, 0)
    g = torch.Generator().manual_seed(5)
    sd: dict[str, torch.Tensor] = {}
    _kohya_pair(sd, "lora_te_", Q, 8, 8, 2, 4.0, g)
    _kohya_pair(sd, "lora_unet_", "down_blocks.0.attentions.0.proj_in", 8, 8, 2, 2.0, g)
    save_file(sd, tmp_path / "sd1.safetensors")
    res = run("convert", str(tmp_path / "sd1.safetensors"), "--to", "diffusers", "--base", str(tmp_path / "te.safetensors"),
              "-o", str(tmp_path / "d.safetensors"), code=1)
    assert "the file holds LoRA for text_encoder, unet: name the base's part with --component" in res.stderr
    run("convert", str(tmp_path / "sd1.safetensors"), "--to", "diffusers", "--base", str(tmp_path / "te.safetensors"),
        "--component", "text_encoder", "-o", str(tmp_path / "d.safetensors"))
    keys = sorted(load_file(tmp_path / "d.safetensors"))
    assert keys == [f"text_encoder.{Q}.lora_A.weight", f"text_encoder.{Q}.lora_B.weight"]
    d = read_adapter(tmp_path / "d.safetensors").targets[f"text_encoder.{Q}"]
    assert d.scale == 2.0 and torch.equal(d.A, sd[f"lora_te_{Q.replace('.', '_')}.lora_down.weight"])
    run("convert", str(tmp_path / "d.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"))
    stem = "lora_te_" + Q.replace(".", "_")
    assert sorted(load_file(tmp_path / "k.safetensors")) == [f"{stem}.alpha", f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"]


def test_a_partless_peft_adapter_gets_its_part_from_component(tmp_path: Path) -> None:
    mod = "down_blocks.0.attentions.0.proj_in"
    save_file({f"base_model.model.{mod}.lora_A.weight": torch.randn(2, 8), f"base_model.model.{mod}.lora_B.weight": torch.randn(8, 2)},
              tmp_path / "p.safetensors")
    res = run("convert", str(tmp_path / "p.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"), "--json")
    assert json.loads(res.stdout)["warnings"] == [
        f"1 target(s) name no pipeline part (e.g. {mod!r}): kohya loaders find layers by lora_unet_ / lora_te_ prefixes "
        "and will skip them; pass --component to say which part they belong to"]
    res = run("convert", str(tmp_path / "p.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k2.safetensors"),
              "--component", "unet", "--json")
    assert json.loads(res.stdout)["warnings"] == []
    assert sorted(load_file(tmp_path / "k2.safetensors"))[0] == "lora_unet_" + mod.replace(".", "_") + ".alpha"


def test_two_modules_with_one_kohya_name_are_named(tmp_path: Path) -> None:
    save_file({f"base_model.model.{m}.lora_{x}.weight": torch.randn(2, 4) if x == "A" else torch.randn(4, 2)
               for m in ("a.b_c", "a_b.c") for x in "AB"}, tmp_path / "p.safetensors")
    res = run("convert", str(tmp_path / "p.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"), code=1)
    assert res.stderr.endswith("modules 'a.b_c' and 'a_b.c' have the same kohya name 'lora_a_b_c' ('.' and '_' both "
                               "become '_'); keep this adapter in peft or diffusers\n")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    ({"lora_unet_x.lora_mid.weight": torch.randn(2, 2, 3, 3)}, "LoCon with a Tucker core (lora_mid: LyCORIS use_tucker)"),
    ({"lora_unet_y.w_norm": torch.randn(8), "lora_unet_y.b_norm": torch.randn(8)}, "trained norm layers (LyCORIS w_norm / b_norm)"),
    ({"lora_unet_y.weight": torch.randn(8), "lora_unet_y.on_input": torch.tensor(False)}, "(IA)³ (LyCORIS)"),
    ({"lora_unet_y.a1.weight": torch.randn(2, 8)}, "GLoRA (LyCORIS)"),
    ({"bundle_emb.cat.string_to_param.*": torch.randn(1, 8)}, "bundled textual-inversion embeddings (bundle_emb)"),
])
def test_non_lora_parts_of_a_kohya_file_are_refused_by_name(tmp_path: Path, extra: dict, message: str) -> None:
    """They used to become modules_to_save and be pasted into the merged checkpoint."""
    sd = {"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 2), **extra}
    save_file(sd, tmp_path / "k.safetensors")
    save_file({"x.weight": torch.randn(8, 8)}, tmp_path / "b.safetensors")
    res = run("merge", str(tmp_path / "b.safetensors"), str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "m.safetensors"),
              code=1)
    assert message in res.stderr and not (tmp_path / "m.safetensors").exists()


def test_lycoris_dora_on_the_input_axis_is_refused(tmp_path: Path) -> None:
    """LyCORIS wd_on_out=False: dora_scale (1, in) normalises columns; it was read as per-row magnitudes."""
    sd = {"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 2),
          "lora_unet_x.dora_scale": torch.rand(1, 8) + 0.5}
    save_file(sd, tmp_path / "k.safetensors")
    res = run("inspect", str(tmp_path / "k.safetensors"), code=1)
    assert res.stderr.endswith("module 'lora_unet_x': dora_scale [1, 8] weighs the input columns (LyCORIS DoRA with "
                               "wd_on_out=False); only DoRA on the output rows is supported\n")
    sd["lora_unet_x.dora_scale"] = torch.rand(1, 16)
    save_file(sd, tmp_path / "k.safetensors")
    res = run("inspect", str(tmp_path / "k.safetensors"), code=1)
    assert res.stderr.endswith("module 'lora_unet_x': dora_scale has 16 values [1, 16] for 8 output rows\n")


def test_lycoris_dora_on_the_output_axis_merges(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 6, generator=g)
    down, up, mag = torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g), torch.rand(8, 1, generator=g) + 0.5
    save_file({"x.weight": W}, tmp_path / "b.safetensors")
    save_file({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up, "lora_unet_x.alpha": torch.tensor(1.0),
               "lora_unet_x.dora_scale": mag}, tmp_path / "k.safetensors")
    run("merge", str(tmp_path / "b.safetensors"), str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "m.safetensors"))
    V = W.double() + 0.5 * up.double() @ down.double()
    want = mag.double() * V / V.norm(dim=1, keepdim=True)
    assert torch.allclose(load_file(tmp_path / "m.safetensors")["x.weight"].double(), want, atol=1e-6)


def test_diffusers_dora_legacy_text_encoder_and_stray_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    W = torch.randn(8, 8, generator=g)
    save_file({f"{Q}.weight": W}, tmp_path / "te.safetensors")
    A, B, m = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), torch.rand(8, generator=g) + 0.5
    # DoRA: lora_magnitude_vector (it was pasted into the checkpoint and plain LoRA applied)
    save_file({f"text_encoder.{Q}.lora_A.weight": A, f"text_encoder.{Q}.lora_B.weight": B,
               f"text_encoder.{Q}.lora_magnitude_vector": m}, tmp_path / "dora.safetensors")
    run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "dora.safetensors"), "-o", str(tmp_path / "m1.safetensors"))
    V = W.double() + B.double() @ A.double()  # no metadata: alpha = r, scale 1
    got = load_file(tmp_path / "m1.safetensors")
    assert sorted(got) == [f"{Q}.weight"]
    assert torch.allclose(got[f"{Q}.weight"].double(), m.double()[:, None] * V / V.norm(dim=1, keepdim=True), atol=1e-6)
    # diffusers 0.14-0.20 text encoders: lora_linear_layer.down/up (it changed nothing and added 2 tensors)
    save_file({f"text_encoder.{Q}.lora_linear_layer.down.weight": A, f"text_encoder.{Q}.lora_linear_layer.up.weight": B},
              tmp_path / "legacy.safetensors")
    run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "legacy.safetensors"), "-o", str(tmp_path / "m2.safetensors"))
    got = load_file(tmp_path / "m2.safetensors")
    assert sorted(got) == [f"{Q}.weight"] and torch.allclose(got[f"{Q}.weight"].double(), V, atol=1e-6)
    # anything else is refused, not pasted into the base
    save_file({f"text_encoder.{Q}.lora_A.weight": A, f"text_encoder.{Q}.lora_B.weight": B,
               "text_encoder.something.else": torch.ones(2)}, tmp_path / "stray.safetensors")
    res = run("merge", str(tmp_path / "te.safetensors"), str(tmp_path / "stray.safetensors"), "-o", str(tmp_path / "m3.safetensors"),
              code=1)
    assert res.stderr.endswith("1 tensor(s) that are not LoRA, e.g. 'text_encoder.something.else': only lora_A/lora_B "
                               "(lora.down/up), alpha, lora_magnitude_vector and lora_B bias are understood\n")


def test_text_encoder_metadata_names_match_clip_with_and_without_text_model(tmp_path: Path) -> None:
    """diffusers strips CLIP's text_model. level (gone in transformers 5) from the keys but not from
    lora_adapter_metadata: names written with it matched no module (NoMatchingPeftModuleError).
    Suffixes without it match either way; our reader gets the same scales back."""
    _encoder(tmp_path / "te.safetensors", 8, 0)
    g = torch.Generator().manual_seed(6)
    sd: dict[str, torch.Tensor] = {}
    _kohya_pair(sd, "lora_te_", Q, 8, 8, 2, 4.0, g)
    _kohya_pair(sd, "lora_te_", FC1, 16, 8, 2, 1.0, g)  # another alpha: an alpha_pattern entry
    save_file(sd, tmp_path / "k.safetensors")
    run("convert", str(tmp_path / "k.safetensors"), "--to", "diffusers", "--base", str(tmp_path / "te.safetensors"),
        "-o", str(tmp_path / "d.safetensors"))
    from safetensors import safe_open

    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert sorted(meta["text_encoder.target_modules"]) == ["encoder.layers.0.mlp.fc1", "encoder.layers.0.self_attn.q_proj"]
    assert all("text_model" not in k for k in meta["text_encoder.alpha_pattern"])
    back = read_adapter(tmp_path / "d.safetensors").targets
    assert back[f"text_encoder.{Q}"].scale == 2.0 and back[f"text_encoder.{FC1}"].scale == 0.5


def test_kohya_stems_never_become_module_names(tmp_path: Path) -> None:
    """resize and compose wrote kohya stems as PEFT module names (base_model.model.lora_unet_...),
    which no merge could match. They are refused outside kohya; compose of kohya files stays kohya."""
    g = torch.Generator().manual_seed(7)
    sd: dict[str, torch.Tensor] = {}
    _kohya_pair(sd, "lora_unet_", "down_blocks.0.attentions.0.proj_in", 8, 8, 2, 2.0, g)
    save_file(sd, tmp_path / "k.safetensors")
    want = ("kohya names are lossy ('.' became '_', e.g. 'lora_unet_down_blocks_0_attentions_0_proj_in') and a peft file "
            "needs module names: map them first with lorasurgeon convert FILE --to peft --base BASE, or write --format kohya\n")
    res = run("resize", str(tmp_path / "k.safetensors"), "--rank", "1", "--format", "peft", "-o", str(tmp_path / "r"), code=1)
    assert res.stderr.endswith(want) and not (tmp_path / "r").exists()
    res = run("compose", str(tmp_path / "k.safetensors"), str(tmp_path / "k.safetensors"), "-m", "cat", "--format", "peft",
              "-o", str(tmp_path / "c"), code=1)
    assert res.stderr.endswith(want) and not (tmp_path / "c").exists()
    res = run("compose", str(tmp_path / "k.safetensors"), str(tmp_path / "k.safetensors"), "-m", "cat",
              "-o", str(tmp_path / "c.safetensors"), "--json")
    assert json.loads(res.stdout)["format"] == "kohya"
    assert sorted(load_file(tmp_path / "c.safetensors"))[0].startswith("lora_unet_down_blocks_0_attentions_0_proj_in.")


def test_compose_refuses_one_layer_under_two_names(tmp_path: Path) -> None:
    """A diffusers unet. file and a PEFT adapter for the same UNet were composed as 2x the layers."""
    mod = "down_blocks.0.attentions.0.proj_in"
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    save_file({f"unet.{mod}.lora_A.weight": A, f"unet.{mod}.lora_B.weight": B}, tmp_path / "d.safetensors")
    save_file({f"base_model.model.{mod}.lora_A.weight": A, f"base_model.model.{mod}.lora_B.weight": B}, tmp_path / "p.safetensors")
    res = run("compose", str(tmp_path / "d.safetensors"), str(tmp_path / "p.safetensors"), "-m", "cat", "-o", str(tmp_path / "c"),
              code=1)
    assert res.stderr.endswith(f"d.safetensors names a layer with its pipeline part ('unet.{mod}') and p.safetensors without "
                               f"('{mod}'): convert one so that both name layers alike (lorasurgeon convert d.safetensors "
                               "--to peft, or p.safetensors --to diffusers --component unet)\n")
    # converted to PEFT first, the two line up: one layer, rank 4
    run("convert", str(tmp_path / "d.safetensors"), "--to", "peft", "-o", str(tmp_path / "dp"))
    res = run("compose", str(tmp_path / "dp"), str(tmp_path / "p.safetensors"), "-m", "cat", "-o", str(tmp_path / "c"), "--json")
    assert [(x["module"], x["rank"]) for x in json.loads(res.stdout)["layers"]] == [(mod, 4)]
