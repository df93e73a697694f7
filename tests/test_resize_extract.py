"""resize (against an independent transcription of kohya's resize_lora) and extract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.io.adapters import read_adapter

runner = CliRunner()


def run(*args: str, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return json.loads(res.stdout) if res.stdout else {}


def kohya_file(tmp_path: Path, rank: int = 16, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inn) in {"lora_unet_a_to_q": (48, 40), "lora_unet_b_ff": (64, 32)}.items():
        down = torch.randn(rank, inn, generator=g) * torch.linspace(1, 0.05, rank)[:, None]
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    sd["lora_unet_c_conv.lora_down.weight"] = torch.randn(rank, 8, 3, 3, generator=g)
    sd["lora_unet_c_conv.lora_up.weight"] = torch.randn(24, rank, 1, 1, generator=g)
    p = tmp_path / "k.safetensors"
    save_file(sd, p, metadata={"ss_network_dim": str(rank)})
    return p, sd


def kohya_reference(up: torch.Tensor, down: torch.Tensor, alpha: float, method: str, param: float, new_rank: int,
                    legacy: bool = False):
    """An independent transcription of kohya sd-scripts networks/resize_lora.py (rank_resize +
    the dynamic index rules) on the dense delta: returns (new_rank, new_alpha, delta). As at
    sd-scripts 063ef10 (after PR #2194), or with ``legacy`` as before that PR."""
    rank = down.shape[0]
    scale = alpha / rank
    W = (up.reshape(up.shape[0], -1).double() @ down.reshape(rank, -1).double())
    U, S, Vh = torch.linalg.svd(W)
    one = 1 if legacy else 0
    if method == "sv_ratio":
        idx = int((S > S[0] / param).sum().item()) - 1 + one
    elif method == "sv_cumulative":
        idx = int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), param).item()) + one
    elif method == "sv_fro":
        idx = int(torch.searchsorted(torch.cumsum(S**2, 0) / (S**2).sum(), param**2).item()) + one
    else:
        idx = int(param) - 1
    idx = max(one, min(idx, len(S) - 1))
    k = idx + 1
    if S[0] <= 1e-6:
        k = 1
    k = min(k, new_rank)
    new_alpha = scale * k
    delta = (new_alpha / k) * (U[:, :k] * S[:k]) @ Vh[:k]
    return k, new_alpha, delta


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("method, value", [("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.7), ("rank", 5)])
def test_resize_matches_kohya(tmp_path: Path, method: str, value: float, legacy: bool) -> None:
    p, sd = kohya_file(tmp_path)
    opt = "--" + method.replace("_", "-")
    if legacy and method == "rank":
        res = runner.invoke(app, ["resize", str(p), "-o", str(tmp_path / "r.safetensors"), "--rank", "5", "--kohya-legacy"])
        assert res.exit_code == 1 and res.stderr == ("error: --kohya-legacy applies to --sv-ratio, --sv-fro and "
                                                     "--sv-cumulative, not --rank\n")
        return
    out = run("resize", str(p), "-o", str(tmp_path / "r.safetensors"), opt, str(value), "--max-rank", "8",
              *(["--kohya-legacy"] if legacy else []))
    new = read_adapter(tmp_path / "r.safetensors")
    assert load_file(tmp_path / "r.safetensors")  # a plain kohya file
    rows = {x["module"]: x for x in out["layers"]}
    for stem in ("lora_unet_a_to_q", "lora_unet_b_ff", "lora_unet_c_conv"):
        up, down = sd[f"{stem}.lora_up.weight"], sd[f"{stem}.lora_down.weight"]
        alpha = float(sd.get(f"{stem}.alpha", torch.tensor(float(down.shape[0]))))
        k, new_alpha, ref = kohya_reference(up, down, alpha, method, float(value), 8, legacy)
        t = new.targets[stem]
        assert rows[stem]["rank_after"] == k == t.rank
        assert t.alpha == pytest.approx(new_alpha)
        ours = t.scale * (t.B.reshape(t.B.shape[0], -1).double() @ t.A.reshape(k, -1).double())
        assert torch.allclose(ours, ref, atol=1e-5 * ref.abs().max())
    assert new.metadata["ss_network_dim"] == "16"


def test_resize_is_best_rank_k_and_keeps_scale(tmp_path: Path) -> None:
    p, sd = kohya_file(tmp_path)
    run("resize", str(p), "-o", str(tmp_path / "same.safetensors"), "--rank", "16")
    same = read_adapter(tmp_path / "same.safetensors")
    orig = read_adapter(p)
    for m, t in orig.targets.items():
        d0 = t.scale * t.B.reshape(t.B.shape[0], -1) @ t.A.reshape(t.rank, -1)
        u = same.targets[m]
        d1 = u.scale * u.B.reshape(u.B.shape[0], -1) @ u.A.reshape(u.rank, -1)
        assert u.scale == pytest.approx(t.scale)
        assert torch.allclose(d0, d1, atol=1e-5)
    out = run("resize", str(p), "-o", str(tmp_path / "r4.safetensors"), "--rank", "4")
    r4 = read_adapter(tmp_path / "r4.safetensors")
    for m, t in orig.targets.items():
        d = (t.scale * t.B.reshape(t.B.shape[0], -1).double() @ t.A.reshape(t.rank, -1).double())
        S = torch.linalg.svdvals(d)
        u = r4.targets[m]
        got = torch.linalg.svdvals(u.scale * u.B.reshape(u.B.shape[0], -1).double() @ u.A.reshape(4, -1).double())
        assert torch.allclose(got[:4], S[:4], rtol=1e-4)
        kept = [x for x in out["layers"] if x["module"] == m][0]["fro_kept"]
        assert kept == pytest.approx(math.sqrt(float((S[:4] ** 2).sum() / (S**2).sum())), rel=1e-4)


def tiny_bert_pair(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)
    base.save_pretrained(tmp_path / "base")
    tuned = transformers.BertModel(cfg)
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        q = tuned.encoder.layer[0].attention.self.query.weight
        q += 0.05 * torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g)
        tuned.encoder.layer[0].intermediate.dense.weight += 0.01 * torch.randn(24, 16, generator=g)
        tuned.encoder.layer[0].output.LayerNorm.bias += 0.1
        tuned.encoder.layer[0].attention.self.query.bias += 0.2  # a LoRA'd module's bias changes too
    tuned.save_pretrained(tmp_path / "tuned")
    return base, tuned


def assert_peft_merge_recovers(base: torch.nn.Module, tuned: torch.nn.Module, adapter: Path) -> None:
    """PEFT loads the extracted adapter onto the base, and its merge equals the fine-tune."""
    peft = pytest.importorskip("peft")
    fresh = type(base)(base.config)
    fresh.load_state_dict(base.state_dict())
    merged = peft.PeftModel.from_pretrained(fresh, str(adapter)).merge_and_unload()
    tsd = tuned.state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, tsd[k], atol=1e-5), k


def test_extract_then_peft_merge_recovers_tuned(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    base, tuned = tiny_bert_pair(tmp_path)
    out = run("extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "-o", str(tmp_path / "ad"),
              "--ratio", "1.0", "--save-other", "--svd", "exact")
    mods = {x["module"]: x for x in out["layers"]}
    assert set(mods) == {"encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense"}
    assert mods["encoder.layer.0.attention.self.query"]["rank"] == 16
    assert out["other_changed"] == ["encoder.layer.0.attention.self.query.bias", "encoder.layer.0.output.LayerNorm.bias"]
    # the LayerNorm whole (modules_to_save); the query's bias as a LoRA bias (its weight is the LoRA)
    assert out["saved_other"] == ["encoder.layer.0.attention.self.query.bias", "encoder.layer.0.output.LayerNorm.bias",
                                  "encoder.layer.0.output.LayerNorm.weight"]
    assert out["extra"]["lora_bias"] == ["encoder.layer.0.attention.self.query.bias"]
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_bias"] is True
    assert_peft_merge_recovers(base, tuned, tmp_path / "ad")


def test_extract_low_rank_error_and_kohya(tmp_path: Path) -> None:
    tiny_bert_pair(tmp_path)
    out = run("extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "-o",
              str(tmp_path / "k.safetensors"), "--rank", "3", "--format", "kohya", "--svd", "exact")
    q = [x for x in out["layers"] if x["module"].endswith("query")][0]
    assert q["rel_error"] < 1e-5  # the query delta has rank 3
    res = runner.invoke(app, ["inspect", str(tmp_path / "k.safetensors"), "--json"])
    assert json.loads(res.stdout)["kind"] == "kohya"
    res = runner.invoke(app, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "-o",
                              str(tmp_path / "k2.safetensors"), "--rank", "3", "--format", "kohya", "--save-other"])
    assert res.exit_code == 1 and ("the bias of 'encoder.layer.0.attention.self.query' changed too: kohya files hold "
                                   "no LoRA bias") in res.stderr and not (tmp_path / "k2.safetensors").exists()
    # diffusers files hold it (lora_B.bias): the same extract there keeps it, and reads back equal
    r = run("extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "-o", str(tmp_path / "d.safetensors"),
            "--rank", "3", "--format", "diffusers", "--save-other", "--svd", "exact", "-i", "*.query.*")
    assert "encoder.layer.0.attention.self.query.bias" in r["extra"]["lora_bias"]
    p = run("extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "-o", str(tmp_path / "p"),
            "--rank", "3", "--save-other", "--svd", "exact", "-i", "*.query.*")
    d_t = read_adapter(tmp_path / "d.safetensors").targets["unet.encoder.layer.0.attention.self.query"]
    p_t = read_adapter(tmp_path / "p").targets["encoder.layer.0.attention.self.query"]
    assert torch.equal(d_t.bias, p_t.bias) and p["extra"]["lora_bias"] == r["extra"]["lora_bias"]


def test_extract_identical_models_is_an_error(tmp_path: Path) -> None:
    tiny_bert_pair(tmp_path)
    res = runner.invoke(app, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"),
                              "-o", str(tmp_path / "x"), "--rank", "2"])
    assert res.exit_code == 1 and "no weight differs between base and tuned model" in res.stderr
    save_file({"other.weight": torch.ones(3, 3)}, tmp_path / "other.safetensors")
    res = runner.invoke(app, ["extract", "--base", str(tmp_path / "other.safetensors"), "--tuned", str(tmp_path / "base"),
                              "-o", str(tmp_path / "x"), "--rank", "2"])
    assert res.exit_code == 1 and "the base and the tuned model share no tensor names" in res.stderr
    assert not (tmp_path / "x").exists()


def test_extract_from_gpt2_conv1d_loads_in_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as in×out: the extracted adapter says fan_in_fan_out, as PEFT's own
    adapters for it do, so PEFT loads it and its merge gives back the fine-tune."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = transformers.GPT2LMHeadModel(cfg).eval()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight += 0.05 * torch.randn(16, 2, generator=g) @ torch.randn(2, 48, generator=g)
        tuned.transformer.h[0].mlp.c_fc.weight += 0.01 * torch.randn(16, 64, generator=g)
    tuned.save_pretrained(tmp_path / "tuned")
    out = run("extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "-o", str(tmp_path / "ad"),
              "--ratio", "1.0", "--svd", "exact")
    rank = {x["module"]: x["rank"] for x in out["layers"]}
    assert rank == {"transformer.h.0.attn.c_attn": 16, "transformer.h.0.mlp.c_fc": 16}
    cfg_json = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg_json["fan_in_fan_out"] is True
    ad = read_adapter(tmp_path / "ad")
    assert tuple(ad.targets["transformer.h.0.attn.c_attn"].A.shape) == (16, 16)  # (r, in): 16 inputs, 48 outputs
    fresh = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    merged = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ad")).merge_and_unload()
    tsd = tuned.state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, tsd[k], atol=1e-5), k
    run("merge", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(tmp_path / "m"))
    ours = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.allclose(ours["transformer.h.0.attn.c_attn.weight"], tsd["transformer.h.0.attn.c_attn.weight"], atol=1e-5)


def test_extract_saves_embedding_tables_whole(tmp_path: Path) -> None:
    """An embedding table is a lookup, not a matrix product: its change goes to modules_to_save
    (with --save-other), not into a LoRA PEFT would refuse next to lora_bias."""
    pytest.importorskip("peft")
    base, tuned = tiny_bert_pair(tmp_path)
    with torch.no_grad():
        tuned.embeddings.word_embeddings.weight += 0.01
    tuned.save_pretrained(tmp_path / "tuned2")
    out = run("extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned2"), "-o", str(tmp_path / "ad"),
              "--ratio", "1.0", "--save-other", "--svd", "exact")
    assert not any("embeddings" in x["module"] for x in out["layers"])
    assert "embeddings.word_embeddings.weight" in out["saved_other"]
    assert_peft_merge_recovers(base, tuned, tmp_path / "ad")


def test_resize_offers_only_its_own_rank_options(tmp_path: Path) -> None:
    p, _ = kohya_file(tmp_path, rank=4)
    res = runner.invoke(app, ["resize", str(p), "-o", str(tmp_path / "r.safetensors")])
    assert res.exit_code == 1 and res.stderr.strip() == (
        "error: give exactly one rank option of --rank, --ratio, --energy, --sv-ratio, --sv-fro, --sv-cumulative")


def test_extract_from_a_factorized_checkpoint_says_so(tmp_path: Path) -> None:
    from lorasurgeon.zoo import digits_cnn_weights

    f = tmp_path / "f.safetensors"
    assert runner.invoke(app, ["factorize", digits_cnn_weights(), "--rank", "4", "--include", "conv*", "-o", str(f)]).exit_code == 0
    res = runner.invoke(app, ["extract", "--base", digits_cnn_weights(), "--tuned", str(f), "--rank", "2", "-o", str(tmp_path / "e")])
    assert res.exit_code == 1 and not (tmp_path / "e").exists()
    assert res.stderr.strip() == f"error: {f}: is a factorized checkpoint; densify it first (factorize --densify)"


def test_extract_pairs_a_head_models_names_reports_what_the_tuned_model_lacks_and_names_parts(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    # a full fine-tune saved by a head class: "bert." before every name, a classifier, no pooler
    tuned = transformers.BertForSequenceClassification(cfg)
    tuned.bert.load_state_dict(base.state_dict())
    q = "encoder.layer.0.attention.self.query.weight"
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)
    sd = {k: v.clone() for k, v in tuned.state_dict().items() if not k.startswith("bert.pooler.")}
    sd[f"bert.{q}"] += delta
    save_file(sd, tmp_path / "tuned.safetensors")
    res = runner.invoke(app, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned.safetensors"),
                              "--rank", "2", "-o", str(tmp_path / "ad"), "--json"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert [x["module"] for x in r["layers"]] == ["encoder.layer.0.attention.self.query"] and r["layers"][0]["rel_error"] < 1e-5
    assert r["extra"]["missing_in_tuned"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert sorted(r["other_changed"]) == ["classifier.bias", "classifier.weight"]
    assert "warning: the tuned model's names start with 'bert.' where the base's do not: paired without it" in res.stderr
    assert ("warning: 2 tensor(s) of the base are not in the tuned model and get no LoRA, e.g. 'pooler.dense.bias' "
            "(listed in extra.missing_in_tuned)") in res.stderr
    t = read_adapter(tmp_path / "ad").targets["encoder.layer.0.attention.self.query"]
    assert torch.allclose(t.scale * t.B @ t.A, delta, atol=1e-5)
    # a kohya output names its pipeline part only when told; PEFT names none
    args = ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned.safetensors"), "--rank", "2"]
    res = runner.invoke(app, [*args, "--format", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0 and "1 target(s) name no pipeline part (e.g. 'encoder.layer.0.attention.self.query'): kohya " \
        "loaders find layers by lora_unet_ / lora_te_ prefixes and will skip them; pass --component" in res.stderr
    run(*args, "--format", "kohya", "--component", "text_encoder", "-o", str(tmp_path / "k2.safetensors"))
    assert set(load_file(tmp_path / "k2.safetensors")) == {f"lora_te_encoder_layer_0_attention_self_query.{x}"
                                                          for x in ("lora_down.weight", "lora_up.weight", "alpha")}
    run(*args, "--component", "unet", "-o", str(tmp_path / "p"), code=1)
    assert not (tmp_path / "p").exists()
    # resize and compose take the part too
    run("resize", str(tmp_path / "ad"), "--rank", "1", "--format", "diffusers", "--component", "unet",
        "-o", str(tmp_path / "r.safetensors"))
    assert all(k.startswith("unet.encoder.layer.0.") for k in load_file(tmp_path / "r.safetensors"))
    c = run("compose", str(tmp_path / "ad"), str(tmp_path / "ad"), "--format", "kohya", "-o", str(tmp_path / "c.safetensors"))
    assert any("name no pipeline part" in w for w in c["warnings"])


def test_extract_states_what_narrow_factors_and_mixed_dtypes_cost(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 24, generator=g)
    d = torch.randn(32, 24, generator=g) * 0.1
    save_file({"l.weight": w.to(torch.bfloat16)}, tmp_path / "b.safetensors")
    save_file({"l.weight": (w + d).to(torch.bfloat16)}, tmp_path / "t.safetensors")
    r = run("extract", "--base", str(tmp_path / "b.safetensors"), "--tuned", str(tmp_path / "t.safetensors"), "--rank", "4",
            "--svd", "exact", "-o", str(tmp_path / "a"))
    layer = r["layers"][0]
    t = read_adapter(tmp_path / "a").targets["l"]
    delta = (w + d).to(torch.bfloat16).float() - w.to(torch.bfloat16).float()
    U, S, Vh = torch.linalg.svd(delta.double())
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    stored = (t.B.double() @ t.A.double())
    assert layer["cast_error"] == pytest.approx(float((stored - best).norm() / best.norm()), rel=0.02)
    assert 1e-4 < layer["cast_error"] < 1e-2
    save_file({"l.weight": w}, tmp_path / "b32.safetensors")
    res = runner.invoke(app, ["extract", "--base", str(tmp_path / "b32.safetensors"), "--tuned", str(tmp_path / "t.safetensors"),
                              "--rank", "4", "--dry-run"])
    assert res.exit_code == 0 and ("warning: the base holds F32 and the tuned model BF16 tensors: their rounding counts as "
                                   "change (cast one to the other's dtype first to extract only the fine-tune)") in res.stderr


def test_extract_keeps_prefixed_copies_beside_the_weights_apart(tmp_path: Path) -> None:
    # an EMA copy (ema.<name>) beside the weights must not pair with the base's tensors: each
    # layer once, from the model's own weights (the copy was pairing too, and the last one won)
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(8, 6, generator=g), "head.weight": torch.randn(3, 8, generator=g)}
    d = {n: torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g) for n, w in base.items()}
    tuned = {n: w + d[n] for n, w in base.items()}
    tuned.update({f"ema.{n}": w + 2 * d[n] for n, w in base.items()})
    save_file(base, tmp_path / "b.safetensors")
    save_file(tuned, tmp_path / "t.safetensors")
    r = run("extract", "--base", str(tmp_path / "b.safetensors"), "--tuned", str(tmp_path / "t.safetensors"), "--rank", "1",
            "--svd", "exact", "-o", str(tmp_path / "a"))
    assert [x["module"] for x in r["layers"]] == ["fc", "head"] and sorted(r["other_changed"]) == ["ema.fc.weight", "ema.head.weight"]
    assert not r.get("warnings")
    ad = read_adapter(tmp_path / "a")
    for n in ("fc", "head"):
        t = ad.targets[n]
        assert torch.allclose(t.scale * t.B @ t.A, d[f"{n}.weight"], atol=1e-5)


@pytest.mark.parametrize("cmd", [["resize", "{k}", "--rank", "1"], ["compose", "{k}", "--method", "cat"],
                                 ["extract", "--base", "{b}", "--tuned", "{b}", "--rank", "1"],
                                 ["merge", "{b}", "{k}"], ["factorize", "{b}", "--rank", "1"]])
def test_writing_commands_need_an_output_unless_dry_run(tmp_path: Path, cmd: list[str]) -> None:
    """The library calls also run in memory (no output); the commands still ask for -o."""
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 2)},
              tmp_path / "k.safetensors")
    save_file({"x.weight": torch.randn(8, 8)}, tmp_path / "b.safetensors")
    args = [a.format(k=tmp_path / "k.safetensors", b=tmp_path / "b.safetensors") for a in cmd]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["message"] == "an output path (-o) is needed unless --dry-run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "k.safetensors"]
