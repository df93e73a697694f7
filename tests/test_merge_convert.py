"""merge and convert, with peft itself as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.io.adapters import read_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
runner = CliRunner()


def run(*args: str, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return json.loads(res.stdout) if res.stdout.strip() else {}


def fail(*args: str, code: int = 1) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == code, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr.strip()


def bert_cfg(**kw):
    return transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=16, **kw)


def make_base(tmp_path: Path, cls=None, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = (cls or transformers.BertModel)(bert_cfg(**kw)).eval()
    model.save_pretrained(tmp_path / "base")
    return model


def fresh(tmp_path: Path, cls=None, **kw) -> nn.Module:
    return (cls or transformers.BertModel).from_pretrained(tmp_path / "base").eval()


def make_adapter(tmp_path: Path, name: str, seed: int, cls=None, **cfg) -> Path:
    torch.manual_seed(seed)
    pm = peft.get_peft_model(fresh(tmp_path, cls), peft.LoraConfig(init_lora_weights=False, **cfg))
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def peft_merged(tmp_path: Path, adapter: Path, cls=None) -> dict[str, torch.Tensor]:
    return peft.PeftModel.from_pretrained(fresh(tmp_path, cls), str(adapter)).merge_and_unload().state_dict()


def assert_state_close(ours: Path, ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    got = load_file(ours / "model.safetensors")
    for k, v in ref.items():
        if k in got:
            assert torch.allclose(got[k], v, atol=atol), (k, (got[k] - v).abs().max())


@pytest.mark.parametrize(
    "cfg",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]),
        dict(r=4, lora_alpha=8, target_modules=["query", "key", "dense"], rank_pattern={"key": 2},
             alpha_pattern={"dense": 3}, use_rslora=True),
        dict(r=3, lora_alpha=6, target_modules=["query", "dense"], lora_bias=True),
        dict(r=4, lora_alpha=4, target_modules=["query", "value"], use_dora=True),
        # PEFT groups each key: "query|key" is one alternation, not "(^|.*\.)query" or "key$"
        dict(r=4, lora_alpha=4, target_modules=["query", "value", "key"], alpha_pattern={"query|key": 10},
             rank_pattern={"key|value": 3}),
    ],
    ids=["plain", "patterns-rslora", "lora-bias", "dora", "pattern-alternation"],
)
def test_merge_equals_peft(tmp_path: Path, cfg: dict) -> None:
    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 1, **cfg)
    out = run("merge", str(tmp_path / "base"), str(ad), "-o", str(tmp_path / "m"))
    assert out["layers"] and all(x["relative_update"] > 0 for x in out["layers"])
    assert (tmp_path / "m" / "config.json").is_file()
    assert_state_close(tmp_path / "m", peft_merged(tmp_path, ad))


def test_weighted_merge_of_two_and_unmerge(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    a1 = make_adapter(tmp_path, "a1", 1, r=4, lora_alpha=8, target_modules=["query", "value"])
    a2 = make_adapter(tmp_path, "a2", 2, r=2, lora_alpha=2, target_modules=["query", "dense"], use_rslora=True)
    run("merge", str(tmp_path / "base"), str(a1), str(a2), "-w", "0.5", "-w", "-2", "-o", str(tmp_path / "m"))
    b = base.state_dict()
    d1 = {k: v - b[k] for k, v in peft_merged(tmp_path, a1).items()}
    d2 = {k: v - b[k] for k, v in peft_merged(tmp_path, a2).items()}
    got = load_file(tmp_path / "m" / "model.safetensors")
    for k in got:
        assert torch.allclose(got[k], b[k] + 0.5 * d1[k] - 2 * d2[k], atol=1e-6), k
    run("merge", str(tmp_path / "m"), str(a1), str(a2), "-w", "0.5", "-w", "-2", "--unmerge", "-o", str(tmp_path / "u"))
    back = load_file(tmp_path / "u" / "model.safetensors")
    for k in back:
        assert torch.allclose(back[k], b[k], atol=1e-6), k


def test_merge_bf16_base_casts_once(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 24, generator=g).to(torch.bfloat16)
    save_file({"l.weight": W}, tmp_path / "b.safetensors")
    A, B = torch.randn(4, 24, generator=g), torch.randn(32, 4, generator=g)
    (tmp_path / "ad").mkdir()
    save_file({"base_model.model.l.lora_A.weight": A, "base_model.model.l.lora_B.weight": B}, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2}))
    run("merge", str(tmp_path / "b.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "o.safetensors"))
    got = load_file(tmp_path / "o.safetensors")["l.weight"]
    ref = (W.double() + 0.5 * B.double() @ A.double()).to(torch.bfloat16)  # one rounding, from exact
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_conv_adapters_equal_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ConvNet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "net.safetensors")
    torch.manual_seed(1)
    pm = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2"], init_lora_weights=False))
    pm.base_model.model.load_state_dict(net.state_dict(), strict=False)
    for n, p in pm.named_parameters():
        if "base_layer" in n:
            p.data.copy_(net.state_dict()[n.replace("base_model.model.", "").replace("base_layer.", "")])
    pm.save_pretrained(tmp_path / "ad")
    ref = pm.merge_and_unload().state_dict()
    run("merge", str(tmp_path / "net.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "o.safetensors"))
    got = load_file(tmp_path / "o.safetensors")
    for k in ("c1.weight", "c2.weight"):
        assert torch.allclose(got[k], ref[k], atol=1e-6)


def test_modules_to_save_replace_base(tmp_path: Path) -> None:
    cls = transformers.BertForSequenceClassification
    make_base(tmp_path, cls, num_labels=3)
    ad = make_adapter(tmp_path, "ad", 1, cls, r=2, target_modules=["query"], modules_to_save=["classifier"])
    # change the saved classifier so the replacement is visible
    sd = load_file(ad / "adapter_model.safetensors")
    sd["base_model.model.classifier.weight"] = sd["base_model.model.classifier.weight"] + 1
    save_file(sd, ad / "adapter_model.safetensors")
    out = run("merge", str(tmp_path / "base"), str(ad), "-o", str(tmp_path / "m"))
    assert out["replaced"] == ["classifier.bias", "classifier.weight"]
    assert_state_close(tmp_path / "m", peft_merged(tmp_path, ad, cls))


def test_kohya_round_trip_and_merge(tmp_path: Path) -> None:
    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 1, r=4, lora_alpha=8, target_modules=["query", "dense"], rank_pattern={"dense": 2})
    from safetensors import safe_open

    run("convert", str(ad), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"))
    with safe_open(tmp_path / "k.safetensors", "pt") as f:  # a file another tool wrote: no recorded module names
        names = json.loads(f.metadata()["lorasurgeon.module_names"])
        save_file({k: f.get_tensor(k) for k in f.keys()}, tmp_path / "plain.safetensors")
    assert names["lora_encoder_layer_0_attention_self_query"] == "encoder.layer.0.attention.self.query"
    assert fail("convert", str(tmp_path / "plain.safetensors"), "--to", "peft", "-o", str(tmp_path / "p")).endswith(
        "kohya names are lossy ('.' became '_', e.g. 'lora_encoder_layer_0_attention_output_dense'); pass --base to map "
        "them to module names")
    run("convert", str(tmp_path / "plain.safetensors"), "--to", "peft", "--base", str(tmp_path / "base"), "-o", str(tmp_path / "p"))
    run("convert", str(tmp_path / "k.safetensors"), "--to", "peft", "-o", str(tmp_path / "p2"))  # our own: no base needed
    shown = run("inspect", str(tmp_path / "k.safetensors"), "-i", "encoder.layer.0.attention.self.query")
    assert [r["module"] for r in shown["adapter"]["rows"]] == ["encoder.layer.0.attention.self.query"]
    assert [r["name"] for r in shown["tensors"]] == [f"lora_encoder_layer_0_attention_self_query.{k}"
                                                     for k in ("alpha", "lora_down.weight", "lora_up.weight")]
    a = read_adapter(ad)
    for out in ("p", "p2"):
        b = read_adapter(tmp_path / out)
        assert set(a.targets) == set(b.targets)
        for m in a.targets:
            da = a.targets[m].scale * a.targets[m].B @ a.targets[m].A
            db = b.targets[m].scale * b.targets[m].B @ b.targets[m].A
            assert torch.allclose(da, db, atol=1e-7)
    run("merge", str(tmp_path / "base"), str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "mk"))
    assert_state_close(tmp_path / "mk", peft_merged(tmp_path, ad))
    # our PEFT output loads in peft and merges to the same weights
    assert_state_close(tmp_path / "mk", peft_merged(tmp_path, tmp_path / "p"))


def test_diffusers_round_trip(tmp_path: Path) -> None:
    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 3, r=2, lora_alpha=3, target_modules=["value"], use_rslora=True)
    run("convert", str(ad), "--to", "diffusers", "-o", str(tmp_path / "d.safetensors"))
    assert run("inspect", str(tmp_path / "d.safetensors"))["kind"] == "diffusers"
    out = run("convert", str(tmp_path / "d.safetensors"), "--to", "peft", "-o", str(tmp_path / "p"))
    assert out["max_abs_delta_diff"] < 1e-6
    run("merge", str(tmp_path / "base"), str(tmp_path / "p"), "-o", str(tmp_path / "m"))
    assert_state_close(tmp_path / "m", peft_merged(tmp_path, ad))


def test_ambiguous_kohya_name(tmp_path: Path) -> None:
    save_file({"a.b_c.weight": torch.zeros(4, 4), "a_b.c.weight": torch.zeros(4, 4)}, tmp_path / "b.safetensors")
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.ones(1, 4), "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 1)},
              tmp_path / "k.safetensors")
    msg = fail("merge", str(tmp_path / "b.safetensors"), str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "o.safetensors"))
    assert msg.endswith("kohya name 'lora_unet_a_b_c' is ambiguous: it fits a.b_c, a_b.c")


def test_merge_errors_write_nothing(tmp_path: Path) -> None:
    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 1, r=2, target_modules=["query"])
    dora = make_adapter(tmp_path, "dora", 1, r=2, target_modules=["query"], use_dora=True)
    other = tmp_path / "other.safetensors"
    save_file({"x.weight": torch.zeros(3, 3)}, other)
    out = str(tmp_path / "o")
    assert "adapter target(s) match no base weight" in fail("merge", str(other), str(ad), "-o", out)
    assert "give one --weight per adapter: 1 adapters, 2 weights" in fail("merge", str(tmp_path / "base"), str(ad), "-w", "1", "-w", "2", "-o", out)
    assert "weighting a DoRA adapter is ill-posed" in fail("merge", str(tmp_path / "base"), str(dora), "-w", "0.5", "-o", out)
    assert "unmerging DoRA is ill-posed" in fail("merge", str(tmp_path / "base"), str(dora), "--unmerge", "-o", out)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_q.hada_w1_a": torch.zeros(2, 2)}, loha)
    assert "LoHa (LyCORIS) adapter: only LoRA (and LoCon) layouts are supported" in fail("merge", str(tmp_path / "base"), str(loha), "-o", out)
    # shape mismatch: an adapter for a wider model
    sd = load_file(ad / "adapter_model.safetensors")
    sd = {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in sd.items()}
    save_file(sd, ad / "adapter_model.safetensors")
    assert "do not fit the base" in fail("merge", str(tmp_path / "base"), str(ad), "-o", out)
    assert not Path(out).exists()
    # --allow-unmatched skips some targets, but an adapter with nothing for this model is an error
    assert fail("merge", str(other), str(tmp_path / "dora"), "--allow-unmatched", "-o", out).endswith(
        "no adapter target matches a base weight: the adapters are not for this model")
    for bad in ("nan", "inf", "1e39"):
        assert "weights must be finite numbers within float32's range" in fail(
            "merge", str(tmp_path / "base"), str(tmp_path / "dora"), "-w", bad, "-o", out)
    ad2 = make_adapter(tmp_path, "ad2", 2, r=2, target_modules=["query"])
    assert "--weight 1e+38 times the adapter's scale 4 for 'encoder.layer.0.attention.self.query' overflows float32" in fail(
        "merge", str(tmp_path / "base"), str(ad2), "-w", "1e38", "-o", out)  # finite alone, not times alpha/r = 8/2
    assert fail("merge", str(tmp_path / "base"), str(ad2), str(dora), "-o", out).startswith(
        f"error: {dora}: module 'encoder.layer.0.attention.self.query': a DoRA adapter cannot be combined")
    assert not Path(out).exists()


def test_merge_modules_to_save_conflicts_and_weights(tmp_path: Path) -> None:
    cls = transformers.BertForSequenceClassification
    make_base(tmp_path, cls, num_labels=3)
    a = make_adapter(tmp_path, "a", 1, cls, r=2, target_modules=["query"], modules_to_save=["classifier"])
    b = make_adapter(tmp_path, "b", 2, cls, r=2, target_modules=["value"], modules_to_save=["classifier"])
    sd = load_file(b / "adapter_model.safetensors")  # b's head differs from a's (both copied the base's)
    sd = {k: v + 1 if ".classifier." in k else v for k, v in sd.items()}
    save_file(sd, b / "adapter_model.safetensors")
    msg = fail("merge", str(tmp_path / "base"), str(a), str(b), "-o", str(tmp_path / "m"))
    assert msg == (f"error: {b}: a and b both replace 'classifier.bias' (modules_to_save) with different tensors; "
                   "a merge cannot add replacements: merge one of them, or compose them first")
    res = runner.invoke(app, ["merge", str(tmp_path / "base"), str(a), "-w", "0.5", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0 and "--weight 0.5 does not scale a's modules_to_save (classifier.bias, classifier.weight)" in res.stderr
    # the same adapter twice replaces with equal tensors: fine
    run("merge", str(tmp_path / "base"), str(a), str(a), "-o", str(tmp_path / "m2"))


def test_formats_that_cannot_hold_a_part_are_refused(tmp_path: Path) -> None:
    cls = transformers.BertForSequenceClassification
    make_base(tmp_path, cls, num_labels=3)
    a = make_adapter(tmp_path, "a", 1, cls, r=2, target_modules=["query"], modules_to_save=["classifier"])
    assert fail("convert", str(a), "--to", "diffusers", "-o", str(tmp_path / "d.safetensors")) == (
        f"error: {a}: diffusers LoRA files cannot hold modules_to_save (classifier.bias, classifier.weight); use peft or kohya")
    run("convert", str(a), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"))  # kohya keeps them
    assert set(read_adapter(tmp_path / "k.safetensors").modules_to_save) == {"classifier.bias", "classifier.weight"}
    # GPT-2's Conv1D: PEFT's fan_in_fan_out has no field in kohya or diffusers files
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2Model(cfg).save_pretrained(tmp_path / "gpt")
    pm = peft.get_peft_model(transformers.GPT2Model.from_pretrained(tmp_path / "gpt"),
                             peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "g")
    for argv in (["convert", str(tmp_path / "g"), "--to", "kohya", "-o", str(tmp_path / "gk.safetensors")],
                 ["compose", str(tmp_path / "g"), str(tmp_path / "g"), "--method", "cat", "--format", "diffusers", "-o",
                  str(tmp_path / "gd.safetensors")]):
        assert "fan_in_fan_out targets (GPT-2 style Conv1D layers, e.g. 'h.0.attn.c_attn') keep their layout only in PEFT" in fail(*argv)
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "gk.safetensors").exists()
    # to peft, a PEFT adapter keeps its module names: GPT2LMHeadModel's start with transformer., not a pipeline part
    lm = transformers.GPT2LMHeadModel(cfg)
    pm = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "glm")
    out = run("convert", str(tmp_path / "glm"), "--to", "peft", "-o", str(tmp_path / "glm2"))
    assert out["renamed"] == {} and set(read_adapter(tmp_path / "glm2").targets) == {"transformer.h.0.attn.c_attn"}


def test_force_never_deletes_an_input_inside_the_output_folder(tmp_path: Path) -> None:
    make_base(tmp_path)
    a = make_adapter(tmp_path, "a", 1, r=2, target_modules=["query"])
    (tmp_path / "keep.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert fail("compose", str(a), str(a), "--method", "cat", "-o", str(tmp_path), "--force") == (
        f"error: {tmp_path}: the output folder holds the input 'a'; replacing the folder would delete it: choose another output")
    assert fail("merge", str(tmp_path / "base"), str(a), "-o", str(tmp_path), "--force").endswith(
        "the output folder holds the input 'base'; replacing the folder would delete it: choose another output")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # nor in place: an input is never modified
    assert fail("merge", str(tmp_path / "base"), str(a), "-o", str(tmp_path / "base"), "--force").endswith(
        "the output is the input 'base'; inputs are never modified: choose another output")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_blockwise_merge_equals_whole_matrix_merge(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                   fan_in_fan_out: bool) -> None:
    """merge_weight_stats in row blocks (forced to 7-row blocks) against the whole-matrix formula."""
    from lorasurgeon.io.adapters import LoraTarget
    from lorasurgeon.ops import lora

    monkeypatch.setattr(lora, "_BLOCK_ELEMS", 7 * 33)
    g = torch.Generator().manual_seed(0)
    out_, in_ = 45, 33
    W = torch.randn((in_, out_) if fan_in_fan_out else (out_, in_), generator=g).to(dtype)
    W0 = W.clone()
    ts = [LoraTarget(module="m", A=torch.randn(r, in_, generator=g), B=torch.randn(out_, r, generator=g),
                     alpha=a, scale=a / r, fan_in_fan_out=fan_in_fan_out) for r, a in ((4, 8.0), (3, 1.0))]
    parts = [(ts[0], 0.5), (ts[1], -2.0)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    delta = sum(w * t.scale * (t.B.to(acc) @ t.A.to(acc)) for t, w in parts)
    ref = (W.to(acc) + (delta.T if fan_in_fan_out else delta)).to(dtype)
    got, st = lora.merge_weight_stats(W, parts, name="m.weight")
    assert torch.equal(W, W0)  # the caller's tensor is untouched
    assert got.dtype == dtype and torch.allclose(got.to(acc), ref.to(acc), atol=1e-5 if acc == torch.float32 else 1e-12,
                                                 rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)
    assert st.base_norm == pytest.approx(float(W.double().norm()), rel=1e-6)
    assert st.update_norm == pytest.approx(float(delta.double().norm()), rel=1e-5)  # the update before the cast
    unmerged = lora.merge_weight(got, parts, unmerge=True)
    if dtype in (torch.float32, torch.float64):
        assert torch.allclose(unmerged, W, atol=1e-5)
    W[3, 4] = float("nan")
    with pytest.raises(Exception, match="base weight 'm.weight' holds NaN or Inf values"):
        lora.merge_weight_stats(W, parts, name="m.weight")


@pytest.mark.parametrize("rows", [3, 16, 50, 47])
def test_blockwise_merge_is_bit_identical_to_one_addmm(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Row blocks (forced to 16 rows of a 8192-wide weight) give the whole-matrix addmm bit for bit.

    Blocks of fewer than 4 rows take a BLAS path that rounds differently; a short last block (50 = 3·16 + 2
    rows) joins the block before it instead.
    """
    from lorasurgeon.io.adapters import LoraTarget
    from lorasurgeon.ops import lora

    monkeypatch.setattr(lora, "_BLOCK_ELEMS", 16 * 8192)

    g = torch.Generator().manual_seed(1)
    W = torch.randn(rows, 8192, generator=g).half()
    t = LoraTarget(module="m", A=torch.randn(16, 8192, generator=g), B=torch.randn(rows, 16, generator=g),
                   alpha=32.0, scale=2.0)
    ref = W.float().addmm_(t.B, t.A, alpha=0.75 * t.scale).half()
    got, _ = lora.merge_weight_stats(W, [(t, 0.75)], name="m.weight")
    assert torch.equal(got, ref)


def test_merge_provenance_hash_is_the_base_files_sha256(tmp_path: Path) -> None:
    """The header is planned with placeholder hashes and rewritten with the real ones at the end."""
    import hashlib

    from lorasurgeon.io.checkpoint import Checkpoint

    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 1, r=2, lora_alpha=4, target_modules=["query"])
    run("merge", str(tmp_path / "base"), str(ad), "-o", str(tmp_path / "out"))
    with Checkpoint.open(tmp_path / "out") as ck:
        prov = json.loads(ck.metadata["lorasurgeon"])
    base_rec, ad_rec = prov["inputs"]
    files = {str(f.relative_to(tmp_path / "base")): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted((tmp_path / "base").rglob("*")) if f.is_file()}
    assert base_rec["sha256"] == hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    assert base_rec["files"] == len(files) and ad_rec["name"] == "ad" and ad_rec["sha256"] != "0" * 64
    assert_state_close(tmp_path / "out", peft_merged(tmp_path, ad))


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_setting_merges_the_trained_biases_and_round_trips(tmp_path: Path, bias: str, lora_bias: bool) -> None:
    """PEFT's bias="lora_only"/"all" save LoRA'd modules' biases as <module>.base_layer.bias: they
    replace the bias, and a lora_bias goes on top of the replacement (as peft merges it)."""
    make_base(tmp_path)
    torch.manual_seed(3)
    pm = peft.get_peft_model(fresh(tmp_path), peft.LoraConfig(r=2, target_modules=["query", "value"], bias=bias,
                                                               lora_bias=lora_bias, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(torch.randn_like(p))  # "trained" biases
    pm.save_pretrained(tmp_path / "ad")
    assert any(k.endswith("query.base_layer.bias") for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    ref = peft_merged(tmp_path, tmp_path / "ad")
    out = run("merge", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(tmp_path / "m"))
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert set(got) == set(ref) and out["added"] == []
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    state = fresh(tmp_path).state_dict()
    from lorasurgeon.merge import merge_state_dict

    mem = merge_state_dict(state, tmp_path / "ad")
    for k, v in ref.items():
        assert torch.allclose(mem[k], v, atol=1e-6), k
    # what we write keeps PEFT's layout: resize to full rank (exact) loads in peft and merges the same
    run("resize", str(tmp_path / "ad"), "--rank", "2", "-o", str(tmp_path / "rs"))
    assert json.loads((tmp_path / "rs" / "adapter_config.json").read_text())["bias"] == bias
    again = peft_merged(tmp_path, tmp_path / "rs")
    for k, v in ref.items():
        assert torch.allclose(again[k], v, atol=1e-5), k


def test_lora_on_a_layer_whose_base_weight_peft_saved_goes_on_that_weight(tmp_path: Path) -> None:
    """LoRA on lm_head with peft's default save_embedding_layers="auto" also saves the layer's base
    weight (lm_head.base_layer.weight): the merge is that weight plus the LoRA update, not the
    saved weight alone."""
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=0,
                                  bos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "base.safetensors")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head", "c_attn"], fan_in_fan_out=True,
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad", save_embedding_layers=True)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "ad" / "adapter_model.safetensors")
    fresh_model = transformers.GPT2LMHeadModel(cfg).eval()
    fresh_model.load_state_dict(state)
    ref = peft.PeftModel.from_pretrained(fresh_model, str(tmp_path / "ad")).merge_and_unload().state_dict()
    assert not torch.allclose(ref["lm_head.weight"], state["lm_head.weight"], atol=1e-3)
    # peft saved fan_in_fan_out=False (lm_head, a Linear, came last) and reads c_attn as Conv1D by its type
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    res = runner.invoke(app, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), "-o",
                              str(tmp_path / "m.safetensors")])
    assert res.exit_code == 0 and "ad: fan_in_fan_out taken from the base's layout for 1 target(s)" in res.stderr
    got = load_file(tmp_path / "m.safetensors")
    for k in got:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k
    # a square Conv1D weight (attn.c_proj): the base's widening layers (c_attn, c_fc) show how it is stored
    for targets in (["c_attn", "attn.c_proj", "lm_head"], ["attn.c_proj", "lm_head"]):
        fresh_model.load_state_dict(state)
        pm = peft.get_peft_model(fresh_model, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(tmp_path / "ad2")
        assert json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
        ref = pm.merge_and_unload().state_dict()
        run("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad2"), "-o", str(tmp_path / "m2.safetensors"),
            "--force")
        got = load_file(tmp_path / "m2.safetensors")
        assert float((got["transformer.h.0.attn.c_proj.weight"] - state["transformer.h.0.attn.c_proj.weight"]).abs().max()) > 1e-3
        for k in got:
            assert torch.allclose(got[k], ref[k], atol=1e-6), (targets, k)
        fresh_model = transformers.GPT2LMHeadModel(cfg).eval()
    # GPT-BigCode names its nn.Linear layers like GPT-2's Conv1D: stored (out, in), no transpose
    bc = transformers.GPTBigCodeConfig(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=0,
                                       bos_token_id=0)
    torch.manual_seed(0)
    big = transformers.GPTBigCodeForCausalLM(bc).eval()
    bstate = {k: v.clone().contiguous() for k, v in big.state_dict().items() if k != "lm_head.weight"}
    save_file(bstate, tmp_path / "bc.safetensors")
    pm = peft.get_peft_model(big, peft.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "bcad")
    ref = pm.merge_and_unload().state_dict()
    run("merge", str(tmp_path / "bc.safetensors"), str(tmp_path / "bcad"), "-o", str(tmp_path / "bm.safetensors"))
    got = load_file(tmp_path / "bm.safetensors")
    for k in got:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k


def test_peft_trainable_tokens_are_refused_by_name(tmp_path: Path) -> None:
    make_base(tmp_path)
    pm = peft.get_peft_model(fresh(tmp_path), peft.LoraConfig(r=2, target_modules=["query"],
                                                              trainable_token_indices={"word_embeddings": [1, 2]}))
    pm.save_pretrained(tmp_path / "ad")
    msg = fail("merge", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(tmp_path / "m"))
    assert msg.endswith("PEFT trainable tokens (trainable_token_indices) are not supported: their rows replace embedding "
                        "rows, which is not a LoRA update")
    assert not (tmp_path / "m").exists()


class _Conv(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8 if groups == 1 else 4, 3, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_conv_dora_round_trip_through_kohya_loads_in_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Conv()
    save_file(net.state_dict(), tmp_path / "c.safetensors")
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["conv"], use_dora=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    run("convert", str(tmp_path / "ad"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"))
    run("convert", str(tmp_path / "k.safetensors"), "--to", "peft", "-o", str(tmp_path / "back"))
    mag = load_file(tmp_path / "back" / "adapter_model.safetensors")["base_model.model.conv.lora_magnitude_vector"]
    assert mag.shape == (1, 8, 1, 1)  # PEFT's conv DoRA shape
    x = torch.randn(2, 4, 6, 6)
    ref = pm.eval()(x)
    back = _Conv()
    back.load_state_dict(load_file(tmp_path / "c.safetensors"))
    got = peft.PeftModel.from_pretrained(back, str(tmp_path / "back")).eval()(x)
    assert torch.allclose(got, ref, atol=1e-5)


def test_grouped_conv_lora_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Conv(groups=4)
    save_file(net.state_dict(), tmp_path / "c.safetensors")
    peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False)).save_pretrained(
        tmp_path / "ad")
    msg = fail("merge", str(tmp_path / "c.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "m.safetensors"))
    assert "look like a grouped-convolution LoRA (4 groups); merging grouped or depthwise conv LoRA is not supported" in msg


def test_named_adapter_subfolders_are_pointed_at(tmp_path: Path) -> None:
    make_base(tmp_path)
    pm = peft.get_peft_model(fresh(tmp_path), peft.LoraConfig(r=2, target_modules=["query"]), adapter_name="styleA")
    pm.save_pretrained(tmp_path / "ads")
    msg = fail("inspect", str(tmp_path / "ads"))
    assert msg.endswith("folder holds PEFT adapters in subfolders (styleA); give one of them")
    run("inspect", str(tmp_path / "ads" / "styleA"))


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dora_and_lora_bias_convert_to_diffusers_and_back(tmp_path: Path, kind: str) -> None:
    # diffusers 0.42 loads these files into a UNet with outputs equal to peft's (0.0 apart; checked
    # outside the suite, which has no diffusers): the same keys and switches PEFT writes
    make_base(tmp_path)
    cfg = dict(use_dora=True) if kind == "dora" else dict(lora_bias=True)
    ad = make_adapter(tmp_path, "ad", 3, r=2, lora_alpha=4, target_modules=["query", "dense"], **cfg)
    sd = load_file(ad / "adapter_model.safetensors")
    for k in sd:  # PEFT starts magnitudes at the base's norms and biases at 0: make both matter
        if "lora_magnitude_vector" in k or k.endswith("lora_B.bias"):
            sd[k] = sd[k] + 0.3 * torch.randn_like(sd[k])
    save_file(sd, ad / "adapter_model.safetensors")
    d = tmp_path / "d.safetensors"
    run("convert", str(ad), "--to", "diffusers", "-o", str(d))
    from safetensors import safe_open
    with safe_open(d, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = set(f.keys())
    assert meta["unet.use_dora" if kind == "dora" else "unet.lora_bias"] is True
    suffix = ".lora_magnitude_vector" if kind == "dora" else ".lora_B.bias"
    assert {k for k in keys if k.endswith(suffix)} == {
        "unet." + k.removeprefix("base_model.model.") for k in sd if k.endswith(suffix)}
    run("convert", str(d), "--to", "peft", "-o", str(tmp_path / "back"))
    x = torch.randint(0, 40, (2, 7))
    ref = peft.PeftModel.from_pretrained(fresh(tmp_path), str(ad)).eval()(x).last_hidden_state
    got = peft.PeftModel.from_pretrained(fresh(tmp_path), str(tmp_path / "back")).eval()(x).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-6)


def test_dora_on_some_modules_only_is_refused_where_one_switch_rules(tmp_path: Path) -> None:
    # LyCORIS files hold dora_scale per module; PEFT and diffusers have one use_dora switch, and
    # peft starts a DoRA layer's missing magnitude from the base weight's norms (not plain LoRA)
    g = torch.Generator().manual_seed(0)
    k: dict[str, torch.Tensor] = {}
    for i in range(2):
        k[f"lora_unet_b{i}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        k[f"lora_unet_b{i}.lora_up.weight"] = torch.randn(6, 2, generator=g)
    k["lora_unet_b0.dora_scale"] = torch.rand(6, 1, generator=g) + 0.5
    save_file(k, tmp_path / "k.safetensors")
    save_file({"b0.weight": torch.randn(6, 8, generator=g), "b1.weight": torch.randn(6, 8, generator=g)},
              tmp_path / "base.safetensors")
    for fmt, out in (("peft", "p"), ("diffusers", "d.safetensors")):
        msg = fail("convert", str(tmp_path / "k.safetensors"), "--to", fmt, "--base", str(tmp_path / "base.safetensors"),
                   "-o", str(tmp_path / out))
        part, per = ("", "adapter") if fmt == "peft" else ("unet.", "part")
        assert msg.endswith(f"module '{part}b0' is DoRA and '{part}b1' is not, but {fmt} has one use_dora switch per "
                            f"{per}; keep this adapter in kohya (LyCORIS) format, or split it (--include/--exclude)"), msg
        assert not (tmp_path / out).exists()
    # split it: each half converts, and merged together they give the kohya file's merge
    base = str(tmp_path / "base.safetensors")
    run("convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--base", base, "-i", "lora_unet_b0", "-o", str(tmp_path / "p0"))
    r = run("convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--base", base, "-x", "*b0", "-o", str(tmp_path / "p1"))
    assert r["targets"] == 1 and r["renamed"] == {"lora_unet_b1": "b1"}
    assert json.loads((tmp_path / "p0" / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((tmp_path / "p1" / "adapter_config.json").read_text())["use_dora"] is False
    run("merge", base, str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "mk.safetensors"))
    run("merge", base, str(tmp_path / "p0"), str(tmp_path / "p1"), "-o", str(tmp_path / "mp.safetensors"))
    mk, mp = load_file(tmp_path / "mk.safetensors"), load_file(tmp_path / "mp.safetensors")
    assert sorted(mk) == sorted(mp) == ["b0.weight", "b1.weight"]
    assert all(torch.allclose(mk[n], mp[n], atol=1e-6) for n in mk)
    msg = fail("convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--base", base, "-i", "*attn*", "-o", str(tmp_path / "p2"))
    assert msg.endswith("--include '*attn*' matches no target; check the pattern (globs over names, e.g. '*.attention.*'); "
                        "this adapter's targets are named like 'lora_unet_b0'"), msg
    # a FIFO as --base (only hashed for the provenance when going to kohya) is refused, not waited on
    import os

    os.mkfifo(tmp_path / "fifo.safetensors")
    msg = fail("convert", str(tmp_path / "p0"), "--to", "kohya", "--base", str(tmp_path / "fifo.safetensors"),
               "-o", str(tmp_path / "k0.safetensors"))
    assert msg.endswith("fifo.safetensors: is a FIFO (named pipe), not a checkpoint file: save the weights to a file first"), msg
    # --component gives a partless kohya stem its part's prefix
    r = run("convert", str(tmp_path / "k.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k1.safetensors"))
    assert r["warnings"] == []  # (lora_unet_ stems name their part)
    save_file({"lora_fc1.lora_down.weight": torch.randn(2, 8, generator=g), "lora_fc1.lora_up.weight": torch.randn(6, 2, generator=g)},
              tmp_path / "generic.safetensors")
    run("resize", str(tmp_path / "generic.safetensors"), "--rank", "1", "--component", "unet", "-o", str(tmp_path / "g1.safetensors"))
    assert sorted(load_file(tmp_path / "g1.safetensors")) == ["lora_unet_fc1.alpha", "lora_unet_fc1.lora_down.weight",
                                                              "lora_unet_fc1.lora_up.weight"]


def test_peft_switches_that_contradict_the_tensors_are_refused(tmp_path: Path) -> None:
    make_base(tmp_path)
    dora = make_adapter(tmp_path, "dora", 1, r=2, target_modules=["query"], use_dora=True)
    out = str(tmp_path / "m")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    msg = fail("merge", str(tmp_path / "base"), str(dora), "-o", out)
    assert msg.endswith("module 'encoder.layer.0.attention.self.query' has a lora_magnitude_vector, but "
                        "adapter_config.json does not set use_dora (peft would ignore it)"), msg
    plain = make_adapter(tmp_path, "plain", 1, r=2, target_modules=["query"])
    cfg = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    msg = fail("merge", str(tmp_path / "base"), str(plain), "-o", out)
    assert msg.endswith("adapter_config.json sets use_dora, but module 'encoder.layer.0.attention.self.query' has no "
                        "lora_magnitude_vector (peft would start its magnitude from the base weight's norms)"), msg
    bias = make_adapter(tmp_path, "bias", 1, r=2, target_modules=["query"], lora_bias=True)
    cfg = json.loads((bias / "adapter_config.json").read_text())
    (bias / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": False}))
    msg = fail("merge", str(tmp_path / "base"), str(bias), "-o", out)
    assert msg.endswith("module 'encoder.layer.0.attention.self.query' has a lora_B bias, but adapter_config.json "
                        "does not set lora_bias (peft would ignore it)"), msg
    assert not Path(out).exists()


def test_merge_warnings_are_in_the_json_result_too(tmp_path: Path) -> None:
    """A script reading --json sees what a person reads on stderr: the same warnings, listed."""
    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 1, r=2, target_modules=["query"])
    sd = load_file(ad / "adapter_model.safetensors")
    extra = {k.replace("layer.0.attention.self.query", "layer.0.attention.self.nowhere"): v.clone() for k, v in sd.items()
             if "layer.0." in k}
    save_file({**sd, **extra}, ad / "adapter_model.safetensors")
    res = runner.invoke(app, ["merge", str(tmp_path / "base"), str(ad), "--allow-unmatched", "-o", str(tmp_path / "m"),
                              "--json"])
    assert res.exit_code == 0, res.stderr
    want = "skipping 1 unmatched target(s): ad: encoder.layer.0.attention.self.nowhere"
    assert json.loads(res.stdout)["warnings"] == [want]
    assert f"warning: {want}\n" in res.stderr
    assert run("merge", str(tmp_path / "base"), str(ad), "--allow-unmatched", "-o", str(tmp_path / "m"),
               "--force")["warnings"] == [want]  # --quiet silences stderr, not the result
    assert run("merge", str(tmp_path / "base"), str(tmp_path / "ad"), "--dry-run", "--allow-unmatched")["warnings"] == [want]


@pytest.mark.parametrize("tie", [True, False])
def test_modules_to_save_on_tied_input_embeddings_is_refused(tmp_path: Path, tie: bool) -> None:
    """A tied model (one stored table for embed_tokens and lm_head) with a changed embed_tokens
    copy: our merged folder changed lm_head too, while peft (live, or merged, saved and reloaded)
    keeps the original lm_head: logits 9.6 apart (helper 39). Untied, the merge equals peft's."""
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    assert ("lm_head.weight" in load_file(tmp_path / "base" / "model.safetensors")) is not tie
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                    init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(1.0)
    pm.save_pretrained(tmp_path / "ad")
    out = tmp_path / "m"
    res = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(out)])
    if tie:
        assert res.exit_code == 1 and res.stderr.strip() == (
            f"error: {tmp_path / 'base'}: the adapters replace 'model.embed_tokens.weight' (modules_to_save), the input "
            "embeddings that this model's output layer shares (tie_word_embeddings): the merged folder would change the "
            "output layer too, where peft keeps the original one; merging such an adapter is not supported")
        assert not out.exists()
        # the mirror: extract --save-other would write that copy, which peft applies to the input side only
        tuned = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        with torch.no_grad():
            tuned.model.embed_tokens.weight.add_(1.0)
            tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)
        tuned.save_pretrained(tmp_path / "tuned")
        res = runner.invoke(app, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                                  "--save-other", "-o", str(tmp_path / "x")])
        assert res.exit_code == 1 and "the input embeddings 'model.embed_tokens.weight' changed, and this model's output " \
            "layer shares them (tie_word_embeddings)" in res.stderr and not (tmp_path / "x").exists()
        return
    assert res.exit_code == 0, res.stderr
    ids = torch.tensor([[1, 5, 9, 2]])
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ad")).eval()(input_ids=ids).logits
        got = transformers.LlamaForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_a_folder_out_leaves_out_the_inputs_weights_in_other_forms(tmp_path: Path) -> None:
    """A folder holding model.safetensors and pytorch_model.bin (and an ONNX export): merge and
    factorize copied the .bin and the .onnx unchanged, so from_pretrained(use_safetensors=False)
    or onnxruntime ran the input model (logits 2.67 from the merge, helper 39)."""
    model = make_base(tmp_path)
    torch.save(model.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    (tmp_path / "base" / "onnx").mkdir()
    (tmp_path / "base" / "onnx" / "model.onnx").write_bytes(b"old graph")
    (tmp_path / "base" / "2_Dense").mkdir()  # a sentence-transformers module of its own: kept
    torch.save({"linear.weight": torch.ones(2, 2)}, tmp_path / "base" / "2_Dense" / "pytorch_model.bin")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    ad = make_adapter(tmp_path, "ad", 1, r=2, target_modules=["query"])
    run("merge", str(tmp_path / "base"), str(ad), "-o", str(tmp_path / "m"))
    run("factorize", str(tmp_path / "base"), "-o", str(tmp_path / "f"), "--rank", "2")
    for out in ("m", "f"):
        files = sorted(str(p.relative_to(tmp_path / out)) for p in (tmp_path / out).rglob("*") if p.is_file())
        assert files == ["2_Dense/pytorch_model.bin", "config.json", "model.safetensors", "tokenizer_config.json"], files


@pytest.mark.parametrize("family", ["bert-mlm", "t5"])
def test_lora_on_other_tied_output_layers_is_named(tmp_path: Path, family: str) -> None:
    """BERT's masked-LM decoder and T5's lm_head share the input embeddings too: 'match no base
    weight ... pass --allow-unmatched' sent users to drop the update (helper 39)."""
    torch.manual_seed(0)
    if family == "bert-mlm":
        model, target = transformers.BertForMaskedLM(bert_cfg()), "cls.predictions.decoder"
    else:
        model, target = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, tie_word_embeddings=True)), "lm_head"
    model.save_pretrained(tmp_path / "base")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=[target], init_lora_weights=False)).save_pretrained(tmp_path / "ad")
    err = fail("merge", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(tmp_path / "m"))
    assert err == (f"error: {tmp_path / 'ad'}: {target!r} has no weight of its own in the base: it is tied to the input "
                   "embeddings, and a LoRA on tied weights (which changes both) is not supported")
    assert not (tmp_path / "m").exists()


def test_a_folder_output_named_like_a_file_is_refused(tmp_path: Path) -> None:
    make_base(tmp_path)
    ad = make_adapter(tmp_path, "ad", 1, r=2, target_modules=["query"])
    err = fail("merge", str(tmp_path / "base"), str(ad), "-o", str(tmp_path / "m.safetensors"))
    assert err.endswith("a model folder in gives a model folder out, but the output's name ends .safetensors: give a "
                        "folder name")
    err = fail("factorize", str(tmp_path / "base"), "--rank", "2", "-o", str(tmp_path / "m.safetensors"))
    assert err.endswith("a model folder in gives a model folder out, but the output's name ends .safetensors: give a "
                        "folder name")
    assert not (tmp_path / "m.safetensors").exists()
