"""PEFT initialisations that change the base weights (PiSSA, OLoRA), and PEFT LoRA variants whose
tensors are not delta W = s·B·A: peft itself is the reference, or the refusal names the feature."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.io.adapters import PEFT_VARIANT_NAMES, read_adapter
from lorasurgeon.merge import merge_state_dict

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
runner = CliRunner()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def trained(tmp_path: Path, init: str, **cfg) -> tuple[dict[str, torch.Tensor], Path, dict[str, torch.Tensor]]:
    """(original base state, adapter folder, peft's merge of the adapter loaded on the original base)."""
    torch.manual_seed(0)
    base = Net()
    orig = {k: v.clone() for k, v in base.state_dict().items()}
    save_file(orig, tmp_path / "base.safetensors")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=cfg.pop("lora_alpha", 8), target_modules=["a", "b"], init_lora_weights=init, **cfg))
    with torch.no_grad():  # "training": the factors move away from their initial values
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / init)
    fresh = Net()
    fresh.load_state_dict(orig)
    ref = peft.PeftModel.from_pretrained(fresh, str(tmp_path / init)).merge_and_unload().state_dict()
    return orig, tmp_path / init, ref


def cli(*args: str, code: int = 0) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == code, (res.stdout, res.stderr)
    return res.stderr.strip()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_merge_equals_peft_loading_the_adapter_on_the_original_base(tmp_path: Path, init: str, rslora: bool) -> None:
    orig, ad, ref = trained(tmp_path, init, use_rslora=rslora)
    # peft runs the initialisation again on the base it loads onto: the change is large, and a
    # plain W + s·B·A misses it
    read = read_adapter(ad)
    assert {t.init for t in read.targets.values()} == {init}
    naive = merge_state_dict(orig, replace(read, targets={m: replace(t, init=None) for m, t in read.targets.items()}))
    assert max_diff(naive, ref) > 0.05
    cli("merge", str(tmp_path / "base.safetensors"), str(ad), "-o", str(tmp_path / "m.safetensors"), "-q")
    assert max_diff(load_file(tmp_path / "m.safetensors"), ref) < 1e-5
    assert max_diff(merge_state_dict(orig, ad), ref) < 1e-5
    assert orig["a.weight"].equal(load_file(tmp_path / "base.safetensors")["a.weight"])  # the caller's state untouched


def test_convert_keeps_the_initialisation_for_peft_and_makes_it_plain_for_kohya(tmp_path: Path) -> None:
    orig, ad, ref = trained(tmp_path, "pissa")
    base = str(tmp_path / "base.safetensors")
    # PEFT output: init_lora_weights stays, and peft reads the copy as it reads the original
    cli("convert", str(ad), "--to", "peft", "-o", str(tmp_path / "p"), "-q")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    fresh = Net()
    fresh.load_state_dict(orig)
    got = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "p")).merge_and_unload().state_dict()
    assert max_diff(got, ref) < 1e-6
    # diffusers keeps it in the part's metadata (diffusers loads through peft)
    cli("convert", str(ad), "--to", "diffusers", "--component", "unet", "-o", str(tmp_path / "d.safetensors"), "-q")
    assert {t.init for t in read_adapter(tmp_path / "d.safetensors").targets.values()} == {"pissa"}
    # kohya cannot say so: refused, nothing written; --plain needs the base
    err = cli("convert", str(ad), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"), code=1)
    assert "was initialised with init_lora_weights='pissa', which changes the base weights, and kohya files cannot say so" in err
    assert not (tmp_path / "k.safetensors").exists()
    err = cli("convert", str(ad), "--to", "kohya", "--plain", "-o", str(tmp_path / "k.safetensors"), code=1)
    assert "--plain needs --base" in err
    # --plain --base: twice the rank, and a plain merge of it is peft's merge
    cli("convert", str(ad), "--to", "kohya", "--plain", "--base", base, "-o", str(tmp_path / "k.safetensors"), "-q")
    k = read_adapter(tmp_path / "k.safetensors")
    assert {t.rank for t in k.targets.values()} == {8} and not any(t.init for t in k.targets.values())
    cli("merge", base, str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "mk.safetensors"), "-q")
    assert max_diff(load_file(tmp_path / "mk.safetensors"), ref) < 1e-5
    cli("convert", str(ad), "--to", "peft", "--plain", "--base", base, "-o", str(tmp_path / "pp"), "-q")
    assert json.loads((tmp_path / "pp" / "adapter_config.json").read_text())["init_lora_weights"] is True
    fresh.load_state_dict(orig)
    got = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "pp")).merge_and_unload().state_dict()
    assert max_diff(got, ref) < 1e-5


def test_what_a_base_changing_initialisation_makes_ill_posed_is_refused(tmp_path: Path) -> None:
    _, ad, _ = trained(tmp_path, "pissa")
    base = str(tmp_path / "base.safetensors")
    out = str(tmp_path / "o.safetensors")
    err = cli("merge", base, str(ad), "-o", out, "--weight", "0.5", code=1)
    assert err == (f"error: {ad}: module 'a' was initialised with init_lora_weights='pissa', which changes the base "
                   "weight: weighting it is ill-posed; merge it with weight 1")
    assert "unmerging it is ill-posed" in cli("merge", base, str(ad), "-o", out, "--unmerge", code=1)
    assert "two adapters whose initialisations change the base weight" in cli("merge", base, str(ad), str(ad), "-o", out, code=1)
    err = cli("compose", str(ad), str(ad), "--method", "cat", "-o", str(tmp_path / "c"), code=1)
    assert "which changes the base weights, so adapters made with it do not add; convert it to a plain LoRA first" in err
    err = cli("resize", str(ad), "--rank", "2", "-o", str(tmp_path / "r"), code=1)
    assert "peft would take a different amount out of the base at another rank" in err
    assert not any((tmp_path / n).exists() for n in ("o.safetensors", "c", "r"))
    # the randomized PiSSA cannot be recomputed (peft's own reload of it differs from the trained model)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    for init in ("pissa_niter_4", "corda", "loftq", "lora_ga"):
        (ad / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
        err = cli("merge", base, str(ad), "-o", out, code=1)
        assert f"init_lora_weights='{init}', which changes the base weight in a way a merge cannot recompute" in err
    out_json = runner.invoke(app, ["inspect", str(ad), "--json"]).stdout
    assert json.loads(out_json)["adapter"]["base_changing_init"] == "lora_ga"


@pytest.mark.parametrize("field,value,says", [
    ("alora_invocation_tokens", [3, 4], "Activated LoRA (aLoRA)"),
    ("use_qalora", True, "QALoRA pools the inputs"),
    ("layer_replication", [[0, 1], [0, 1]], "it stacks repeated base layers"),
    ("target_parameters", ["a.gate"], "LoRA on parameters (target_parameters"),
    ("kasa_config", {"r": 4}, "KaSA truncates the base weight"),
    ("use_bdlora", {"nblocks": 2}, "BD-LoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow routes"),
])
def test_peft_variants_that_are_not_plain_lora_are_refused_by_name(tmp_path: Path, field: str, value, says: str) -> None:
    _, ad, _ = trained(tmp_path, "gaussian")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    for args in (["merge", str(tmp_path / "base.safetensors"), str(ad), "-o", str(tmp_path / "o.safetensors")],
                 ["convert", str(ad), "--to", "kohya", "-o", str(tmp_path / "o.safetensors")]):
        err = cli(*args, code=1)
        assert err.startswith(f"error: {ad / 'adapter_config.json'}: {field} is set: {says}"), err
        assert len(err.splitlines()) == 1
        assert not (tmp_path / "o.safetensors").exists()
    # inspect describes it (exit 0), says what it is and why the other commands refuse it
    res = runner.invoke(app, ["inspect", str(ad), "--json"])
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["kind"] == f"non-lora:{PEFT_VARIANT_NAMES[field]} (PEFT)" and got["adapter"] is None
    assert got["unsupported"].startswith(f"{field} is set: {says}")
    assert got["kind_description"] == f"LoRA variant that is not plain LoRA: {PEFT_VARIANT_NAMES[field]} (PEFT)"
    assert got["totals"]["tensors"] == len(load_file(ad / "adapter_model.safetensors"))


@pytest.mark.parametrize("field", ["kasa_config", "arrow_config", "use_bdlora"])
def test_an_empty_peft_subconfig_switches_its_variant_on(tmp_path: Path, field: str) -> None:
    """peft builds KaSA's, Arrow's and BD-LoRA's sub-config from any dict, {} included (its
    defaults): the variant is on, and Arrow's plain lora_A/lora_B would otherwise merge as LoRA."""
    _, ad, _ = trained(tmp_path, "gaussian")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, field: {}}))
    err = cli("merge", str(tmp_path / "base.safetensors"), str(ad), "-o", str(tmp_path / "o.safetensors"), code=1)
    assert err.startswith(f"error: {ad / 'adapter_config.json'}: {field} is set: "), err
    assert json.loads(runner.invoke(app, ["inspect", str(ad), "--json"]).stdout)["kind"] == (
        f"non-lora:{PEFT_VARIANT_NAMES[field]} (PEFT)")
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, field: None}))  # null: off, plain LoRA
    cli("merge", str(tmp_path / "base.safetensors"), str(ad), "-o", str(tmp_path / "o.safetensors"))


@pytest.mark.parametrize("make", ["loha", "ia3", "prompt", "boft"])
def test_other_peft_methods_are_described_by_inspect_and_refused_by_merge(tmp_path: Path, make: str) -> None:
    """inspect used to fail (exit 1) on any PEFT adapter that is not LoRA, where a LyCORIS LoHa
    file was described: it now names the method and lists the tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    save_file({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    cfg = {"loha": lambda: peft.LoHaConfig(r=2, target_modules=["0"]),
           "ia3": lambda: peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]),
           "boft": lambda: peft.BOFTConfig(boft_block_size=2, target_modules=["0"]),
           "prompt": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3, token_dim=8,
                                                     num_transformer_submodules=1, num_attention_heads=1, num_layers=1)}[make]()
    if make == "prompt":  # prompt tuning needs a transformer; its saved state is only the prompt table
        d = tmp_path / "ad"
        d.mkdir()
        save_file({"prompt_embeddings": torch.randn(3, 8)}, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    else:
        peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "ad")
    ptype, name = {"loha": ("LOHA", "LoHa"), "ia3": ("IA3", "IA3"), "prompt": ("PROMPT_TUNING", "prompt tuning"),
                   "boft": ("BOFT", "BOFT")}[make]
    res = runner.invoke(app, ["inspect", str(tmp_path / "ad"), "--json"])
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert (got["kind"], got["kind_description"]) == (f"non-lora:{name} (PEFT)", f"non-LoRA adapter: {name} (PEFT)")
    assert got["unsupported"] == f"peft_type {ptype} is not LoRA; only LoRA adapters are supported"
    assert sorted(t["name"] for t in got["tensors"]) == sorted(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    err = cli("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "m.safetensors"), code=1)
    assert err == f"error: {tmp_path / 'ad' / 'adapter_config.json'}: peft_type {ptype} is not LoRA; only LoRA adapters are supported"
    err = cli("factorize", str(tmp_path / "ad"), "-o", str(tmp_path / "f.safetensors"), "--rank", "1", code=1)
    assert err == f"error: {tmp_path / 'ad'}: this is an adapter ({name} (PEFT)), not a model"
    if make in ("loha", "boft"):  # its weights file alone is named alike (it was "LoHa (LyCORIS)")
        res = runner.invoke(app, ["inspect", str(tmp_path / "ad" / "adapter_model.safetensors"), "--json"])
        assert json.loads(res.stdout)["kind"] == f"non-lora:{name} (PEFT)"
    assert cli("export", str(tmp_path / "ad"), "-o", str(tmp_path / "x.onnx"), "-q", code=1) == (
        f"error: {tmp_path / 'ad'}: this is an adapter ({name} (PEFT)), not a model")
    # a hand-broken config is still an error, not a description
    (tmp_path / "ad" / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is not valid JSON" in cli("inspect", str(tmp_path / "ad"), code=1)


def test_variants_that_merge_as_plain_lora_equal_peft(tmp_path: Path) -> None:
    """Initialisations that leave the base alone, VeLoRA and MonteCLoRA (their training-only
    tensors are read past, not pasted into the base), and target_parameters on a module's weight."""
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    for name, kw in (("gaussian", {}), ("orthogonal", {}), ("mica", {}),
                     ("velora", {"velora_config": VeloraConfig(num_groups=4, init_type="random")}),
                     ("monteclora", {"monteclora_config": MontecloraConfig()})):
        d = tmp_path / name
        d.mkdir()
        orig, ad, ref = trained(d, "gaussian" if kw else name, **kw)
        if kw:  # the variant's own tensors are in the file
            assert any(f".lora_{name}" in k for k in load_file(ad / "adapter_model.safetensors")), name
        cli("merge", str(d / "base.safetensors"), str(ad), "-o", str(d / "m.safetensors"), "-q")
        assert max_diff(load_file(d / "m.safetensors"), ref) < 1e-6, name
    # target_parameters on 'weight': the factors apply to that module's weight, as LoRA on the module
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "monteclora_config": None, "target_modules": [],
                                                        "target_parameters": ["a.weight", "b.weight"]}))
    cli("merge", str(d / "base.safetensors"), str(ad), "-o", str(d / "m2.safetensors"), "-q")
    assert max_diff(load_file(d / "m2.safetensors"), ref) < 1e-6


def test_an_unknown_lora_tensor_kind_is_refused_not_pasted_into_the_base(tmp_path: Path) -> None:
    # e.g. KaSA's learned diagonal: without this check it would read as a modules_to_save tensor
    g = torch.Generator().manual_seed(0)
    state = {"base_model.model.a.lora_A.weight": torch.randn(4, 16, generator=g),
             "base_model.model.a.lora_B.weight": torch.randn(12, 4, generator=g),
             "base_model.model.a.lora_diag.default": torch.randn(4, generator=g)}
    save_file(state, tmp_path / "kasa.safetensors")
    err = cli("inspect", str(tmp_path / "kasa.safetensors"), code=1)
    assert ("tensor 'base_model.model.a.lora_diag.default' is a LoRA part this reader does not know (lora_diag)" in err)


def test_pissa_on_gpt2_conv1d_weights_equals_peft(tmp_path: Path) -> None:
    # fan_in_fan_out: PiSSA factorizes the (out, in) matrix of a weight stored (in, out)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=0,
                                  bos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    orig = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(orig, tmp_path / "g.safetensors")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights="pissa"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "ad")
    fresh = transformers.GPT2Model(cfg).eval()
    fresh.load_state_dict(orig)
    ref = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ad")).merge_and_unload().state_dict()
    cli("merge", str(tmp_path / "g.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "m.safetensors"), "-q")
    got = load_file(tmp_path / "m.safetensors")
    assert max(float((got[k].double() - ref[k].double()).abs().max()) for k in got) < 1e-5
    assert float((got["h.0.attn.c_attn.weight"] - orig["h.0.attn.c_attn.weight"]).abs().max()) > 0.05


def test_multihead_attention_lora_is_refused_by_name(tmp_path: Path) -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    torch.manual_seed(0)
    model = Attn()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    err = cli("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "m.safetensors"),
              code=1)
    assert err == (f"error: {tmp_path / 'ad'}: 'mha' is an nn.MultiheadAttention (it has in_proj_weight): LoRA on "
                   "MultiheadAttention modules is not supported")


def test_lora_on_a_tied_output_layer_is_refused_by_name(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=0,
                                  bos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "base")  # the tied lm_head.weight is stored once, as transformer.wte.weight
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    err = cli("merge", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(tmp_path / "m"), code=1)
    assert err == (f"error: {tmp_path / 'ad'}: 'lm_head' has no weight of its own in the base: it is tied to the input "
                   "embeddings, and a LoRA on tied weights (which changes both) is not supported")
    assert not (tmp_path / "m").exists()


def test_a_transposed_base_weight_is_the_wrong_base_outside_gpt2_style_models(tmp_path: Path) -> None:
    _, ad, _ = trained(tmp_path, "gaussian")
    state = load_file(tmp_path / "base.safetensors")
    save_file({k: v.T.contiguous() if k == "a.weight" else v for k, v in state.items()}, tmp_path / "t.safetensors")
    err = cli("merge", str(tmp_path / "t.safetensors"), str(ad), "-o", str(tmp_path / "m.safetensors"), code=1)
    assert "1 adapter target(s) do not fit the base: gaussian: a (adapter [12, 16] vs the base [16, 12])" in err


def test_initialisation_edge_cases_follow_peft(tmp_path: Path) -> None:
    """r above the layer's smaller side (peft keeps that many rows, scale alpha/r); a LoRA'd
    lm_head whose weight peft saved as the initialisation left it (no second correction, and
    convert keeps it under the LoRA, not as a whole module); an init value peft does not know."""
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "base.safetensors")
    for name, kw in (("bigr", dict(r=24, target_modules=["k_proj", "q_proj"])),  # k_proj is 8x16: r > 8
                     ("head", dict(r=4, target_modules=["q_proj", "lm_head"]))):
        for init in ("pissa", "olora"):
            fresh = transformers.LlamaForCausalLM(cfg).eval()
            fresh.load_state_dict(state)
            pm = peft.get_peft_model(fresh, peft.LoraConfig(lora_alpha=8, init_lora_weights=init, **kw))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.add_(torch.randn_like(p) * 0.1)
            d = tmp_path / f"{name}_{init}"
            pm.save_pretrained(d)
            other = transformers.LlamaForCausalLM(cfg).eval()
            other.load_state_dict(state)
            ref = peft.PeftModel.from_pretrained(other, str(d)).merge_and_unload().state_dict()
            cli("merge", str(tmp_path / "base.safetensors"), str(d), "-o", str(tmp_path / "m.safetensors"), "--force", "-q")
            got = load_file(tmp_path / "m.safetensors")
            assert max(float((got[k] - ref[k]).abs().max()) for k in got) < 1e-5, (name, init)
            if name == "head":  # peft loads the converted copy as it loads the original
                assert "base_model.model.lm_head.base_layer.weight" in load_file(d / "adapter_model.safetensors")
                cli("convert", str(d), "--to", "peft", "-o", str(tmp_path / "c"), "--force", "-q")
                assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["modules_to_save"] is None
                other = transformers.LlamaForCausalLM(cfg).eval()
                other.load_state_dict(state)
                again = peft.PeftModel.from_pretrained(other, str(tmp_path / "c")).merge_and_unload().state_dict()
                assert max(float((again[k] - ref[k]).abs().max()) for k in ref) < 1e-6
    c = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**c, "init_lora_weights": "PiSSA"}))
    err = cli("merge", str(tmp_path / "base.safetensors"), str(d), "-o", str(tmp_path / "x.safetensors"), code=1)
    assert err.endswith("'init_lora_weights' is 'PiSSA', not an initialisation peft knows (peft refuses to load it)")
