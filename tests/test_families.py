"""Model families other than BERT (found by a new-user trial): tied embeddings, encoder-only
classes, classifier heads of several modules, and weights a factorized folder cannot rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.nn.models import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
runner = CliRunner()
SMALL = dict(vocab_size=8)


def _save(tmp_path: Path, name: str, model) -> Path:
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name


def _csv(tmp_path: Path) -> Path:
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"{'a b' if i % 2 else 'c a'},{'xy'[i % 2]}\n" for i in range(24)))
    return p


def _assert_peft_equals_our_merge(tmp_path: Path, base: Path, ids: list[list[int]]) -> None:
    """peft loads the adapter in tmp_path/a on the folder's classifier and gives what our merged classifier folder gives."""
    cls = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    pm = peft.PeftModel.from_pretrained(cls, str(tmp_path / "a")).eval()
    _run("merge", str(base), str(tmp_path / "a"), "-o", str(tmp_path / "m"))
    merged = load_model(tmp_path / "m").model
    x = torch.tensor(ids)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-5)


def _run(*args: str) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_bart_tied_embeddings_load_attach_and_factorize(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BartConfig(**SMALL, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    bart = _save(tmp_path, "bart", transformers.BartModel(cfg))
    out = _run("attach", str(bart), "--data", str(_csv(tmp_path)), "--epochs", "1", "-o", str(tmp_path / "a"))
    assert out["heads"] == ["classification_head"]  # the whole new head is trained and saved, not LoRA'd
    assert not any(m.startswith("classification_head") for m in out["targets"])
    _run("factorize", str(bart), "--ratio", "0.5", "-o", str(tmp_path / "f"))  # `shared` is an nn.Embedding: skipped
    assert "shared.weight" in load_file(tmp_path / "f" / "model.safetensors")
    load_model(tmp_path / "f")  # tied embed_tokens filled from `shared` by our strict loader


def test_t5_encoder_folder_loads_as_its_encoder_class(tmp_path: Path) -> None:
    cfg = transformers.T5Config(**SMALL, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    t5 = _save(tmp_path, "t5", transformers.T5EncoderModel(cfg))
    assert type(load_model(t5).model).__name__ == "T5EncoderModel"
    out = _run("factorize", str(t5), "--ratio", "0.5", "-o", str(tmp_path / "f"))
    skipped = {s["module"] for s in out["skipped"]}
    assert {"shared", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"} <= skipped
    assert type(load_model(tmp_path / "f").model).__name__ == "T5EncoderModel"
    # T5's feed-forward reads wo.weight.dtype: a factorized wo used to break the forward (and export)
    ex = _run("export", str(tmp_path / "f"), "-o", str(tmp_path / "f.onnx"))
    assert ex["verification"]["passed"]
    # the library's load_factorized fills the tied embed_tokens from shared, as load_model does
    from lorasurgeon.nn.layers import load_factorized

    torch.manual_seed(1)
    fm = load_factorized(transformers.T5EncoderModel(cfg), tmp_path / "f" / "model.safetensors")
    ids = torch.tensor([[1, 2, 3, 4]])
    want = load_model(tmp_path / "f").model(input_ids=ids).last_hidden_state
    assert torch.allclose(fm.eval()(input_ids=ids).last_hidden_state, want, atol=1e-6)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_classifier_heads_of_other_encoders(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    if family == "roberta":  # its classifier has no pooler, the bare folder has one
        cfg = transformers.RobertaConfig(**SMALL, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=40, pad_token_id=0)
        model, heads = transformers.RobertaModel(cfg), ["classifier"]
    else:  # pre_classifier and classifier are both new
        cfg = transformers.DistilBertConfig(**SMALL, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
        model, heads = transformers.DistilBertModel(cfg), ["pre_classifier", "classifier"]
    base = _save(tmp_path, family, model)
    out = _run("attach", str(base), "--data", str(_csv(tmp_path)), "--epochs", "1", "-o", str(tmp_path / "a"))
    assert sorted(out["heads"]) == sorted(heads)
    _assert_peft_equals_our_merge(tmp_path, base, [[2, 5, 6, 3]])


def test_weights_a_factorized_folder_could_not_rebuild_are_refused_up_front(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(**SMALL, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    gpt2 = _save(tmp_path, "gpt2", transformers.GPT2Model(cfg))
    res = runner.invoke(app, ["factorize", str(gpt2), "--ratio", "0.5", "-o", str(tmp_path / "f")])
    assert res.exit_code == 1 and not (tmp_path / "f").exists()
    assert "selected weight(s) are GPT-2 style Conv1D layers (e.g. 'h.0.attn.c_attn')" in res.stderr


def test_vision_folders_are_refused_clearly(tmp_path: Path) -> None:
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4, num_channels=1, num_labels=3)
    vit = tmp_path / "vitcls"
    transformers.ViTForImageClassification(cfg).save_pretrained(vit)
    res = runner.invoke(app, ["export", str(vit), "-o", str(tmp_path / "v.onnx"), "--quiet"])
    assert res.exit_code == 1 and res.stderr.strip() == (
        f"error: {vit}: the folder holds a ViTForImageClassification: only sequence-classification heads are loaded "
        "with their model; its head would be dropped")
    res = runner.invoke(app, ["attach", str(vit), "--data", "digits", "-o", str(tmp_path / "a")])
    assert res.exit_code == 1 and "transformers has no sequence-classification model for 'vit' folders" in res.stderr


def test_extract_leaves_an_embedding_named_otherwise_to_save_other(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.T5Config(**SMALL, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    model = transformers.T5EncoderModel(cfg)
    base = _save(tmp_path, "base", model)
    with torch.no_grad():
        model.shared.weight.add_(0.1)
        model.encoder.block[0].layer[1].DenseReluDense.wi.weight.add_(0.1)
    tuned = _save(tmp_path, "tuned", model)
    out = _run("extract", "--base", str(base), "--tuned", str(tuned), "--rank", "1", "-o", str(tmp_path / "e"))
    assert [x["module"] for x in out["layers"]] == ["encoder.block.0.layer.1.DenseReluDense.wi"]
    assert "shared.weight" in out["other_changed"]


def test_gpt2_conv1d_attach_loads_in_peft(tmp_path: Path) -> None:
    """LoRA on GPT-2's Conv1D layers: saved with fan_in_fan_out; peft's model gives our merged folder's logits."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**SMALL, n_embd=16, n_layer=1, n_head=2, n_positions=16, pad_token_id=0)
    base = _save(tmp_path, "gpt2", transformers.GPT2Model(cfg))
    out = _run("attach", str(base), "--data", str(_csv(tmp_path)), "--epochs", "2", "--lr", "0.05", "-o", str(tmp_path / "a"))
    assert "h.0.attn.c_attn" in {t.rpartition("transformer.")[2] for t in out["targets"]} and out["heads"] == ["score"]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    # a tiny run may keep epoch 0 (B = 0): give B values so that the comparison sees the LoRA path
    from safetensors.torch import save_file

    f = tmp_path / "a" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g) * 0.1 if k.endswith("lora_B.weight") else v) for k, v in load_file(f).items()}
    save_file(state, f, metadata={"format": "pt"})
    _assert_peft_equals_our_merge(tmp_path, base, [[5, 6, 7, 5]])
