"""export: ONNX graphs verified against PyTorch, dynamic axes, determinism, adapters, gates, errors."""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasurgeon import export as ex
from lorasurgeon.cli.app import app
from lorasurgeon.export import SENTENCES, export_model, parse_input_shape
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.nn.layers import factorized_layers
from lorasurgeon.nn.models import load_model, model_outputs
from lorasurgeon.zoo import mlp

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

runner = CliRunner()
MLP = "lorasurgeon.zoo:mlp"


def run(*args: str, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return json.loads(res.stdout) if res.stdout.strip() else {}


def ort_run(path: Path, feed: dict[str, np.ndarray], adapter: Path | None = None) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ro = None
    if adapter is not None:
        ro = ort.RunOptions()
        la = ort.LoraAdapter()
        la.Load(str(adapter))
        ro.add_active_adapter(la)
    return sess.run(None, feed, ro)[0]


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def mlp_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    p = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, p)
    return p


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level tokenizer over the sample sentences."""
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    words = sorted({w.strip(".,?'!").lower() for s in SENTENCES for w in s.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "'", "-", *words]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"))  # (the fast one maps every word to [UNK] in transformers 5)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert_factorized(tiny_bert: Path) -> Path:
    out = tiny_bert.parent / "tiny-bert-f50"
    res = run("factorize", str(tiny_bert), "-o", str(out), "--ratio", "0.5")
    assert any(x["rank"] for x in res["layers"])
    return out


@pytest.fixture(scope="module")
def tiny_bert_onnx(tiny_bert: Path) -> tuple[Path, dict]:
    out = tiny_bert.parent / "exported" / "d.onnx"
    out.parent.mkdir()
    return out, run("export", str(tiny_bert), "-o", str(out))


def text_feed(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


@functools.lru_cache(maxsize=4)
def loaded(folder: Path):  # noqa: ANN201
    return load_model(folder, attn_implementation="eager")


def torch_out(folder: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    lm = loaded(folder)
    with torch.inference_mode():
        return model_outputs(lm, {k: torch.from_numpy(v) for k, v in feed.items()}).numpy()


# --------------------------------------------------------------------------- tensor models
def test_mlp_exports_verified_with_dynamic_batch(tmp_path: Path, mlp_weights: Path) -> None:
    out = tmp_path / "mlp.onnx"
    res = run("export", str(mlp_weights), "--arch", MLP, "-o", str(out))
    assert res["schema"] == "lorasurgeon.export/1" and res["kind"] == "tensor"
    assert res["inputs"] == [{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]
    assert res["outputs"][0]["name"] == "logits" and res["external_data"] is None
    v = res["verification"]
    assert v["passed"] and v["max_abs_error"] <= 1e-4 and [c["batch"] for c in v["cases"]] == [1, 2, 5]
    assert res["matmul_nodes"] == 3 and res["sha256"] == sha(out) and res["bytes"] == out.stat().st_size
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    rec = json.loads(meta["lorasurgeon"])
    assert rec["command"] == "export" and rec["inputs"][0]["name"] == "mlp.safetensors" and rec["options"]["opset"] == 17
    lm = load_model(mlp_weights, arch=MLP)
    for b in (1, 9):  # dynamic batch axis
        x = torch.randn(b, 64)
        got = ort_run(out, {"x": x.numpy()})
        assert got.shape == (b, 10)
        np.testing.assert_allclose(got, lm.model(x).detach().numpy(), atol=1e-5)
    assert leftovers(tmp_path) == []


class FixedCNN(torch.nn.Module):
    """A conv net whose flatten fixes the image size (8×8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def fixed_cnn() -> torch.nn.Module:
    return FixedCNN()


def test_cnn_input_shapes(tmp_path: Path) -> None:
    # Global pooling: any size runs, so the spatial axes are dynamic too.
    res = run("export", "--arch", "lorasurgeon.zoo:digits_cnn", "--input-shape", "1x8x8", "-o", str(tmp_path / "a.onnx"))
    assert res["inputs"][0]["shape"] == ["batch", 1, "height", "width"] and res["verification"]["passed"]
    assert [c["shape"] for c in res["verification"]["cases"]][-1] == [2, 1, 16, 16]
    for size in (8, 12):
        assert ort_run(tmp_path / "a.onnx", {"x": np.zeros((3, 1, size, size), np.float32)}).shape == (3, 10)
    # A flatten fixes the size: inferred from the first conv (the first common size that runs).
    res = run("export", "--arch", f"{__name__}:fixed_cnn", "-o", str(tmp_path / "b.onnx"))
    assert res["inputs"][0]["shape"] == ["batch", 1, 8, 8] and len(res["verification"]["cases"]) == 3


def test_parse_input_shape() -> None:
    assert parse_input_shape("3,224,224") == (3, 224, 224) and parse_input_shape("64") == (64,)
    for bad in ("", "a,b", "3,-1", "0"):
        with pytest.raises(ex.InvalidOptionError):
            parse_input_shape(bad)


def test_fp16_and_external_data(tmp_path: Path, mlp_weights: Path) -> None:
    res = run("export", str(mlp_weights), "--arch", MLP, "--dtype", "fp16", "-o", str(tmp_path / "h.onnx"))
    assert res["dtype"] == "fp16" and res["verification"]["atol"] == 1e-2 and res["verification"]["passed"]
    m = onnx.load(str(tmp_path / "h.onnx"))
    assert {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in m.graph.initializer if i.dims} == {np.dtype(np.float16)}
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io stays fp32
    # Weights at or past the threshold (2 GB by default) go to OUT.data beside OUT.
    r = export_model(mlp_weights, tmp_path / "big.onnx", arch=MLP, external_data_threshold=1)
    data = tmp_path / "big.onnx.data"
    assert r.external_data == str(data) and data.stat().st_size > 250_000 > (tmp_path / "big.onnx").stat().st_size
    assert r.bytes == data.stat().st_size + (tmp_path / "big.onnx").stat().st_size
    assert ort_run(tmp_path / "big.onnx", {"x": np.zeros((3, 64), np.float32)}).shape == (3, 10)


def test_fp16_tolerance_scales_with_the_outputs(tmp_path: Path) -> None:
    """fp16 keeps about 3 significant digits: large logits pass atol + rtol·max|ref| by default,
    and fail a fixed atol alone (--rtol 0) with a message giving both terms."""
    torch.manual_seed(1)
    m = mlp()
    with torch.no_grad():
        m.classifier.weight.mul_(400)
    p = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, p)
    res = run("export", str(p), "--arch", MLP, "--dtype", "fp16", "-o", str(tmp_path / "a.onnx"))
    v = res["verification"]
    assert v["passed"] and v["rtol"] == 5e-3 and v["max_abs_error"] > 1e-2
    assert all(c["max_abs_error"] <= 1e-2 + 5e-3 * c["ref_max_abs"] for c in v["cases"])
    r = runner.invoke(app, ["export", str(p), "--arch", MLP, "--dtype", "fp16", "--rtol", "0", "-o", str(tmp_path / "b.onnx")])
    assert r.exit_code == 3 and " > atol 0.01 (at input " in r.stderr and not (tmp_path / "b.onnx").exists()
    r = runner.invoke(app, ["export", str(p), "--arch", MLP, "--dtype", "fp16", "--rtol", "1e-6", "-o", str(tmp_path / "b.onnx")])
    assert r.exit_code == 3 and " > atol 0.01 + rtol 1e-06 × max|ref| " in r.stderr
    r = runner.invoke(app, ["export", str(p), "--arch", MLP, "--rtol", "-1", "-o", str(tmp_path / "b.onnx")])
    assert r.exit_code == 1 and "--rtol must be a number >= 0, got -1" in r.stderr


# --------------------------------------------------------------------------- text encoders
def test_tiny_bert_dense_and_factorized(tmp_path: Path, tiny_bert: Path, tiny_bert_factorized: Path,
                                       tiny_bert_onnx: tuple[Path, dict]) -> None:
    dense_file, dense = tiny_bert_onnx
    fact = run("export", str(tiny_bert_factorized), "-o", str(tmp_path / "f.onnx"))
    assert [i["name"] for i in dense["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert dense["inputs"][0]["shape"] == ["batch", "sequence"] and dense["outputs"] == [{"name": "embeddings", "shape": ["batch", 32], "dtype": "float32"}]
    assert dense["verification"]["passed"] and fact["verification"]["passed"]
    assert {(c["batch"], c["seq_len"]) for c in dense["verification"]["cases"]} == {(1, 7), (2, 16), (4, 48), (8, 64)}
    # Each factorized Linear in the graph is two thin MatMuls, never re-multiplied into one.
    with Checkpoint.open(tiny_bert_factorized) as ck:
        layers = factorized_layers(ck.metadata)
    in_graph = [n for n in layers if not n.startswith("pooler")]  # the pooler is unused by mean pooling
    assert fact["factorized_layers"] == len(layers) and in_graph
    d_ops, f_ops = op_counts(dense_file), op_counts(tmp_path / "f.onnx")
    assert f_ops["MatMul"] + f_ops["Gemm"] == d_ops["MatMul"] + d_ops["Gemm"] + len(in_graph) == fact["matmul_nodes"]
    inits = {i.name: tuple(i.dims) for i in onnx.load(str(tmp_path / "f.onnx")).graph.initializer}
    rank = layers["encoder.layer.0.intermediate.dense"]["rank"]
    assert (32, rank) in inits.values() and (rank, 64) in inits.values() and (32, 64) not in inits.values()
    # Two batch sizes and lengths through the dynamic axes, against PyTorch on real tokenizer output.
    for texts in (["hello world"], SENTENCES[:5]):
        for folder, onnx_file in ((tiny_bert, dense_file), (tiny_bert_factorized, tmp_path / "f.onnx")):
            feed = text_feed(folder, list(texts))
            got = ort_run(onnx_file, feed)
            assert got.shape == (len(texts), 32)
            np.testing.assert_allclose(got, torch_out(folder, feed), atol=1e-5)


def test_byte_identical_repeat(tmp_path: Path, tiny_bert: Path, tiny_bert_onnx: tuple[Path, dict]) -> None:
    res = run("export", str(tiny_bert), "-o", str(tmp_path / "other-name.onnx"))
    assert sha(tmp_path / "other-name.onnx") == sha(tiny_bert_onnx[0]) == res["sha256"] == tiny_bert_onnx[1]["sha256"]


def test_optimize_fuses_attention_and_stays_verified(tmp_path: Path, tiny_bert: Path) -> None:
    res = run("export", str(tiny_bert), "--optimize", "-o", str(tmp_path / "o.onnx"))
    assert res["optimized"].startswith("onnxruntime.transformers") and res["verification"]["passed"]
    assert res["fused_ops"].get("Attention") == 2 and res["fused_ops"].get("SkipLayerNormalization") == 4
    assert op_counts(tmp_path / "o.onnx")["Attention"] == 2


def test_quantize_gate(tmp_path: Path, tiny_bert: Path) -> None:
    res = run("export", str(tiny_bert), "--quantize", "int8", "-o", str(tmp_path / "q.onnx"))
    a = res["agreement"]
    assert res["quantized"] == "int8" and a["metric"] == "mean_cosine" and a["passed"] and a["value"] >= 0.99
    assert op_counts(tmp_path / "q.onnx")["DynamicQuantizeLinear"] > 0
    # A gate the int8 graph cannot meet: exit 3, nothing written.
    run("export", str(tiny_bert), "--quantize", "int8", "--min-agreement", "1.0", "-o", str(tmp_path / "q2.onnx"), code=3)
    assert not (tmp_path / "q2.onnx").exists() and leftovers(tmp_path) == []


def test_classifier_folder_exports_logits(tmp_path: Path, tiny_bert: Path) -> None:
    cfg = transformers.BertConfig.from_pretrained(tiny_bert, num_labels=3)
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    folder = tmp_path / "clf"
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    res = run("export", str(folder), "-o", str(tmp_path / "c.onnx"))
    assert res["outputs"][0]["name"] == "logits" and res["verification"]["passed"]
    assert ort_run(tmp_path / "c.onnx", text_feed(folder, ["hello world"])).shape == (1, 3)


# --------------------------------------------------------------------------- verification
def test_broken_export_is_caught(tmp_path: Path, mlp_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights changed after tracing: the graph no longer computes the PyTorch model's function."""
    real = ex._torch_export

    def export_then_tamper(module, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(module, *args, **kwargs)
        with torch.no_grad():
            module.model.fc2.weight.add_(0.05)

    monkeypatch.setattr(ex, "_torch_export", export_then_tamper)
    res = runner.invoke(app, ["export", str(mlp_weights), "--arch", MLP, "-o", str(tmp_path / "x.onnx"), "--quiet"])
    assert res.exit_code == 3, res.stderr
    assert "differs from PyTorch" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_atol_gate_exit_3_and_json_error(tmp_path: Path, tiny_bert: Path) -> None:
    res = runner.invoke(app, ["export", str(tiny_bert), "--dtype", "fp16", "--atol", "1e-9", "--rtol", "0", "-o",
                              str(tmp_path / "x.onnx"), "--json", "--quiet"])
    assert res.exit_code == 3
    assert json.loads(res.stdout)["error"]["kind"] == "verification_failed"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- adapters
def write_peft(folder: Path, targets: dict[str, tuple[int, int]], r: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    sd = {}
    for m, (out_f, in_f) in targets.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(targets)}))
    return folder


def test_adapter_merged_equals_exported_merged_checkpoint(tmp_path: Path, mlp_weights: Path) -> None:
    ad = write_peft(tmp_path / "ad", {"fc1": (256, 64), "fc2": (256, 256)})
    run("merge", str(mlp_weights), str(ad), "-o", str(tmp_path / "merged.safetensors"))
    a = run("export", str(mlp_weights), "--arch", MLP, "--adapter", str(ad), "-o", str(tmp_path / "a.onnx"))
    b = run("export", str(tmp_path / "merged.safetensors"), "--arch", MLP, "-o", str(tmp_path / "b.onnx"))
    assert a["adapter_mode"] == "merged" and a["adapters"] == [str(ad)] and b["adapters"] == []
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "a.onnx")).graph.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    base = run("export", str(mlp_weights), "--arch", MLP, "-o", str(tmp_path / "base.onnx"))
    assert base["sha256"] != a["sha256"]  # the adapter changed the function
    run("export", str(mlp_weights), "--arch", MLP, "--adapter", str(write_peft(tmp_path / "bad", {"nope": (4, 4)})),
        "-o", str(tmp_path / "c.onnx"), code=1)
    assert a["warnings"] == []
    part = write_peft(tmp_path / "part", {"fc1": (256, 64), "nope": (4, 4)})
    res = runner.invoke(app, ["export", str(mlp_weights), "--arch", MLP, "--adapter", str(part), "--allow-unmatched",
                              "-o", str(tmp_path / "d.onnx"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["warnings"] == ["skipping 1 unmatched adapter target(s): part: nope"]
    assert "warning: skipping 1 unmatched adapter target(s): part: nope\n" in res.stderr
    # a DyLoRA-trained kohya file: export says what merge says
    g = torch.Generator().manual_seed(5)
    save_file({"lora_unet_fc1.lora_down.weight": torch.randn(2, 64, generator=g),
               "lora_unet_fc1.lora_up.weight": torch.randn(256, 2, generator=g)}, tmp_path / "dy.safetensors",
              metadata={"ss_network_args": json.dumps({"algo": "dylora"})})
    dy = run("export", str(mlp_weights), "--arch", MLP, "--adapter", str(tmp_path / "dy.safetensors"), "-o",
             str(tmp_path / "dy.onnx"))
    assert dy["warnings"] == ["dy.safetensors was trained as DyLoRA (ss_network_args); it is merged as LoCon at "
                              "alpha/r, as LyCORIS's and kohya's loaders read it"]


def test_separate_adapters_switch_at_run_time(tmp_path: Path, mlp_weights: Path) -> None:
    a1 = write_peft(tmp_path / "one", {"fc1": (256, 64), "fc2": (256, 256)}, seed=1)
    a2 = write_peft(tmp_path / "two", {"classifier": (10, 256)}, r=2, seed=2)
    out = tmp_path / "s.onnx"
    res = run("export", str(mlp_weights), "--arch", MLP, "--adapter", str(a1), "--adapter", str(a2),
              "--separate-adapters", "-o", str(out))
    files = [tmp_path / "s.one.onnx_adapter", tmp_path / "s.two.onnx_adapter"]
    assert res["adapter_mode"] == "separate" and res["adapter_files"] == [str(f) for f in files]
    assert all(v["passed"] for v in res["adapter_verification"])
    x = {"x": np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)}
    run("export", str(mlp_weights), "--arch", MLP, "-o", str(tmp_path / "base.onnx"))
    np.testing.assert_allclose(ort_run(out, x), ort_run(tmp_path / "base.onnx", x), atol=1e-5)  # no adapter active
    for ad, f in zip((a1, a2), files):
        run("export", str(mlp_weights), "--arch", MLP, "--adapter", str(ad), "-o", str(tmp_path / f"m-{ad.name}.onnx"))
        np.testing.assert_allclose(ort_run(out, x, adapter=f), ort_run(tmp_path / f"m-{ad.name}.onnx", x), atol=1e-5)


@pytest.mark.slow
def test_peft_adapter_on_bert_merged_and_separate(tmp_path: Path, tiny_bert: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModel.from_pretrained(tiny_bert), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "ad")
    merged = run("export", str(tiny_bert), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "m.onnx"))
    sep = run("export", str(tiny_bert), "--adapter", str(tmp_path / "ad"), "--separate-adapters", "-o", str(tmp_path / "s.onnx"))
    assert merged["verification"]["passed"] and sep["adapter_verification"][0]["passed"]
    assert sep["warnings"] == ["adapter targets outside the exported graph (the output does not use them): pooler.dense"]
    # The pooler is outside a mean-pooled graph: its LoRA is left out of the switchable inputs.
    inputs = [i.name for i in onnx.load(str(tmp_path / "s.onnx")).graph.input]
    assert "encoder.layer.0.attention.self.query.lora_A" in inputs and not any("pooler" in n for n in inputs)
    feed = text_feed(tiny_bert, list(SENTENCES[:3]))
    with_adapter = ort_run(tmp_path / "s.onnx", feed, adapter=Path(sep["adapter_files"][0]))
    np.testing.assert_allclose(with_adapter, ort_run(tmp_path / "m.onnx", feed), atol=1e-5)
    assert np.abs(with_adapter - ort_run(tmp_path / "s.onnx", feed)).max() > 1e-3  # the adapter matters


# --------------------------------------------------------------------------- benchmark
def test_benchmark_with_baseline(tmp_path: Path, mlp_weights: Path) -> None:
    fact = tmp_path / "f.safetensors"
    run("factorize", str(mlp_weights), "-o", str(fact), "--ratio", "0.25")
    (tmp_path / "out").mkdir()
    res = run("export", str(fact), "--arch", MLP, "--baseline", str(mlp_weights), "--batch-size", "4",
              "--warmup", "1", "--runs", "3", "--threads", "1", "-o", str(tmp_path / "out" / "f.onnx"))
    assert res["factorized_layers"] == 3 and res["matmul_nodes"] == 6  # fc1, fc2 and the classifier as pairs
    b = res["benchmark"]
    assert (b["batch_size"], b["seq_len"], b["threads"], b["runs"]) == (4, None, 1, 3)
    for t in (b["pytorch"], b["onnxruntime"], b["baseline"]["pytorch"], b["baseline"]["onnxruntime"]):
        assert 0 < t["median_ms"] <= t["p90_ms"] and t["runs"] == 3
    assert b["speedup_vs_baseline"] > 0 and b["baseline"]["verification"]["passed"] and b["baseline"]["bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.onnx"]  # the baseline's graph is not kept


# --------------------------------------------------------------------------- errors
def test_errors_are_one_line(tmp_path: Path, mlp_weights: Path) -> None:
    cases = [
        (["export", str(tmp_path / "missing"), "-o", str(tmp_path / "o.onnx")], 1, "no such file or folder"),
        (["export", "--arch", MLP, "--input-shape", "3,x", "-o", str(tmp_path / "o.onnx")], 1, "--input-shape"),
        (["export", "--arch", MLP, "--input-shape", "3,5", "-o", str(tmp_path / "o.onnx")], 1, "does not run"),
        (["export", "--arch", MLP, "--opset", "9", "-o", str(tmp_path / "o.onnx")], 1, "--opset"),
        (["export", "--arch", MLP, "--dtype", "bf16", "-o", str(tmp_path / "o.onnx")], 1, "--dtype"),
        (["export", "--arch", MLP, "--separate-adapters", "-o", str(tmp_path / "o.onnx")], 1, "--adapter"),
    ]
    for args, code, needle in cases:
        res = runner.invoke(app, [*args, "--quiet"])
        assert res.exit_code == code, (args, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    (tmp_path / "o.onnx").write_bytes(b"keep")
    res = runner.invoke(app, ["export", "--arch", MLP, "-o", str(tmp_path / "o.onnx"), "--quiet"])
    assert res.exit_code == 1 and "--force" in res.stderr and (tmp_path / "o.onnx").read_bytes() == b"keep"
    assert leftovers(tmp_path) == []


def _copy_folder(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    """transformers fills missing weights with random values and only logs it: the export ran, and
    verified against the same half-random model ("passed")."""
    from safetensors.torch import load_file

    state = load_file(tiny_bert / "model.safetensors")
    del state["encoder.layer.1.output.dense.weight"]
    partial = _copy_folder(tiny_bert, tmp_path / "partial", state)
    res = run("export", str(partial), "-o", str(tmp_path / "p.onnx"), code=1)
    assert res["error"]["message"] == ("weights do not fit the model config.json describes: 1 missing "
                                       "(e.g. ['encoder.layer.1.output.dense.weight'])")
    assert not (tmp_path / "p.onnx").exists()
    # a bare encoder's own pooler may be absent (sentence-transformers folders): mean pooling never uses it
    state = load_file(tiny_bert / "model.safetensors")
    nopool = _copy_folder(tiny_bert, tmp_path / "nopool", {k: v for k, v in state.items() if not k.startswith("pooler.")})
    run("export", str(nopool), "-o", str(tmp_path / "n.onnx"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folders_export_in_fp32(tiny_bert: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """transformers keeps an fp16/bf16 folder's dtype: the fp16 graph failed fp32 verification
    (or was written as fp16 while the report said fp32); bf16 had no onnxruntime kernels."""
    from safetensors.torch import load_file

    state = {k: v.to(dtype) for k, v in load_file(tiny_bert / "model.safetensors").items()}
    half = _copy_folder(tiny_bert, tmp_path / "half", state)
    cfg = json.loads((half / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (half / "config.json").write_text(json.dumps(cfg))
    res = run("export", str(half), "-o", str(tmp_path / "h.onnx"))
    assert res["dtype"] == "fp32" and res["verification"]["passed"]
    m = onnx.load(str(tmp_path / "h.onnx"))
    assert {t.data_type for t in m.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_unbuildable_models_are_one_line_errors(tiny_bert: Path, tmp_path: Path) -> None:
    """Both were "internal error ... report it"."""
    bad = tmp_path / "nomodel"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes((tiny_bert / "model.safetensors").read_bytes())
    res = run("export", str(bad), "-o", str(tmp_path / "a.onnx"), code=1)
    assert res["error"]["kind"] != "internal" and res["error"]["message"].startswith(
        "config.json names no model transformers can build (Unrecognized model")
    mod = tmp_path / "dictmods.py"
    mod.write_text("import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.l = torch.nn.Linear(4, 2)\n    def forward(self, x):\n        return {'y': self.l(x)}\n"
                   "def m():\n    return M()\n")
    save_file({"l.weight": torch.randn(2, 4), "l.bias": torch.randn(2)}, tmp_path / "d.safetensors")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        res = run("export", str(tmp_path / "d.safetensors"), "--arch", "dictmods:m", "--input-shape", "4",
                  "-o", str(tmp_path / "d.onnx"), code=1)
    finally:
        sys.path.remove(str(tmp_path))
    assert res["error"]["message"] == ("the model's forward returns a dict, not a tensor: give a module:factory whose "
                                       "forward returns one tensor (its logits or embeddings)")


def test_a_convolutional_backbone_folder_exports_spatially_pooled_embeddings(tmp_path: Path) -> None:
    """A ConvNext folder's (batch, channels, h, w) output was averaged over the channels, giving a
    (batch, h, w) "embedding", and verified against the same mistake (helper 39)."""
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    torch.manual_seed(0)
    transformers.ConvNextModel(cfg).eval().save_pretrained(tmp_path / "cn")
    res = run("export", str(tmp_path / "cn"), "--input-shape", "3,32,32", "-o", str(tmp_path / "cn.onnx"))
    assert res["outputs"][0]["shape"] == ["batch", 16]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = transformers.ConvNextModel.from_pretrained(tmp_path / "cn").eval()
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(x)).last_hidden_state.mean(dim=(2, 3)).numpy()
    sess = __import__("onnxruntime").InferenceSession(str(tmp_path / "cn.onnx"))
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], want, atol=1e-5)


def test_a_language_model_folder_says_its_head_is_not_exported(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "lm")
    res = run("export", str(tmp_path / "lm"), "-o", str(tmp_path / "lm.onnx"))
    assert res["warnings"] == ["the folder holds a GPT2LMHeadModel; its language-model head is not exported: the graph "
                               "outputs the mean-pooled last hidden states (sentence embeddings)"]


def test_an_encoder_decoder_folder_is_refused_by_name(tmp_path: Path) -> None:
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    res = runner.invoke(app, ["export", str(tmp_path / "t5"), "-o", str(tmp_path / "t5.onnx")])
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        "T5Model is an encoder-decoder model; export takes encoders (and classifiers): save its encoder alone "
        "(e.g. T5EncoderModel) and export that")
    assert not (tmp_path / "t5.onnx").exists()
