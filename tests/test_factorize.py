"""factorize / densify: factors, formats, models rebuilt from the file, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.errors import FormatError
from lorasurgeon.factorize import factorize_weight
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.nn.layers import LowRankConv2d, apply_factorization, load_factorized
from lorasurgeon.nn.models import load_model
from lorasurgeon.ops import ranks

runner = CliRunner()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Linear(8 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def spectrum_weight(m: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    S = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.5
    return (U * S @ V.T).to(dtype)


def write(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "in.safetensors") -> Path:
    p = tmp_path / name
    save_file(sd, p)
    return p


def run(*args: str, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return json.loads(res.stdout) if res.stdout else {}


def test_factors_multiply_back_and_error_is_dropped_energy(tmp_path: Path) -> None:
    w = spectrum_weight(64, 40)
    p = write(tmp_path, {"a.weight": w, "a.bias": torch.ones(64)})
    out = run("factorize", str(p), "-o", str(tmp_path / "o.safetensors"), "--rank", "12", "--svd", "exact")
    got = load_file(tmp_path / "o.safetensors")
    assert set(got) == {"a.weight_u", "a.weight_v", "a.bias"}
    assert got["a.weight_u"].shape == (64, 12) and got["a.weight_v"].shape == (12, 40)
    approx = got["a.weight_u"].double() @ got["a.weight_v"].double()
    S = torch.linalg.svdvals(w.double())
    expected = float((S[12:] ** 2).sum().sqrt() / (S**2).sum().sqrt())
    assert float((w.double() - approx).norm() / w.double().norm()) == pytest.approx(expected, rel=1e-4)
    layer = out["layers"][0]
    assert layer["rel_error"] == pytest.approx(expected, rel=1e-4)
    assert layer["energy_kept"] == pytest.approx(1 - expected**2, rel=1e-4)
    assert (layer["params_before"], layer["params_after"]) == (64 * 40, 12 * 104)
    meta = json.loads(Checkpoint.open(tmp_path / "o.safetensors").metadata["lorasurgeon"])
    assert meta["format"] == "factorized" and meta["version"] == 1
    assert meta["layers"] == {"a": {"kind": "linear", "rank": 12, "shape": [64, 40]}}
    assert meta["inputs"][0]["name"] == "in.safetensors"


def test_balanced_split() -> None:
    w = spectrum_weight(30, 20)
    u, v, _ = factorize_weight(w, 5, method="exact")
    # U·diag(√S) and diag(√S)·Vᵀ: equal column/row norms.
    assert torch.allclose(u.norm(dim=0), v.norm(dim=1), rtol=1e-4)


def test_dtype_kept_and_randomized_close_to_exact(tmp_path: Path) -> None:
    w = spectrum_weight(256, 200, dtype=torch.bfloat16)
    p = write(tmp_path, {"l.weight": w})
    ex = run("factorize", str(p), "-o", str(tmp_path / "e.safetensors"), "--rank", "20", "--svd", "exact")
    rn = run("factorize", str(p), "-o", str(tmp_path / "r.safetensors"), "--rank", "20", "--svd", "randomized")
    assert load_file(tmp_path / "r.safetensors")["l.weight_u"].dtype == torch.bfloat16
    e, r = ex["layers"][0]["rel_error"], rn["layers"][0]["rel_error"]
    assert e <= r <= e * 1.01


def test_break_even_keeps_dense(tmp_path: Path) -> None:
    p = write(tmp_path, {"sq.weight": spectrum_weight(20, 20), "tall.weight": spectrum_weight(60, 10)})
    out = run("factorize", str(p), "-o", str(tmp_path / "o.safetensors"), "--rank", "9")
    by = {x["module"]: x for x in out["layers"]}
    assert by["sq"]["rank"] == 9  # 9*40 = 360 < 400
    assert by["tall"]["rank"] is None and by["tall"]["status"].startswith("dense")  # 9*70 = 630 >= 600
    got = load_file(tmp_path / "o.safetensors")
    assert "tall.weight" in got and "sq.weight_u" in got
    assert out["warnings"] == []
    # every layer dense: said, since distill and --densify will not take the copy as factorized
    out = run("factorize", str(p), "-o", str(tmp_path / "d.safetensors"), "--rank", "15")
    assert out["warnings"] == ["no layer was factorized: every one of the 2 selected layer(s) stays dense (see each "
                               "layer's status), so the output is a dense copy"]


def test_model_at_full_rank_equals_dense() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    layers, state = {}, {}
    for name, mod in [("fc1", net.fc1), ("fc2", net.fc2), ("conv", net.conv)]:
        w = mod.weight.detach()
        k = min(w.shape[0], w[0].numel())
        u, v, _ = factorize_weight(w, k, method="exact", name=f"{name}.weight")
        layers[name] = {"kind": "conv2d" if w.ndim == 4 else "linear", "rank": k, "shape": list(w.shape)}
        state[f"{name}.weight_u"], state[f"{name}.weight_v"] = u, v
    low = apply_factorization(net, layers)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith(("fc1.weight", "fc2.weight", "conv.weight"))}
    low.load_state_dict({**sd, **state}, strict=True)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(low(x), net(x), atol=1e-5)
    assert isinstance(low.conv, LowRankConv2d) and isinstance(net.conv, nn.Conv2d)  # caller's model untouched


def test_conv_truncated_matches_dense_truncation() -> None:
    conv = nn.Conv2d(6, 12, 3, padding=1, stride=1)
    u, v, _ = factorize_weight(conv.weight.detach(), 4, method="exact")
    low = LowRankConv2d(conv, 4)
    low.load_state_dict({"weight_u": u, "weight_v": v, "bias": conv.bias.detach()})
    W = conv.weight.detach().reshape(12, -1).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Wk = (U[:, :4] * S[:4] @ Vh[:4]).reshape(conv.weight.shape).float()
    x = torch.randn(2, 6, 9, 9)
    ref = nn.functional.conv2d(x, Wk, conv.bias, padding=1)
    assert torch.allclose(low(x), ref, atol=1e-4)


def test_conv_needs_naming_and_round_trip_through_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = Net().eval()
    p = write(tmp_path, {k: v.contiguous() for k, v in net.state_dict().items()}, "net.safetensors")
    out = run("factorize", str(p), "-o", str(tmp_path / "a.safetensors"), "--ratio", "0.5")
    skipped = {s["module"]: s["reason"] for s in out["skipped"]}
    assert skipped["conv"].startswith("conv: groups unknown") and "dw" in skipped
    out = run("factorize", str(p), "-o", str(tmp_path / "b.safetensors"), "--ratio", "0.5", "--include", "conv", "--include", "fc*")
    assert {x["module"] for x in out["layers"]} == {"conv", "fc1", "fc2"}
    low = load_factorized(net, tmp_path / "b.safetensors")
    assert isinstance(low.conv, LowRankConv2d)
    x = torch.randn(2, 3, 8, 8)
    assert low(x).shape == (2, 10)
    # densify gives back a dense state dict that the plain model loads.
    run("factorize", str(tmp_path / "b.safetensors"), "--densify", "-o", str(tmp_path / "d.safetensors"))
    dense = load_file(tmp_path / "d.safetensors")
    net2 = Net().eval()
    net2.load_state_dict(dense)
    assert torch.allclose(net2(x), low(x), atol=1e-5)


def test_arch_confirms_conv_groups_without_calibration(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = Net().eval()
    p = write(tmp_path, {k: v.contiguous() for k, v in net.state_dict().items()}, "net.safetensors")
    out = run("factorize", str(p), "-o", str(tmp_path / "a.safetensors"), "--ratio", "0.5", "--arch", "tests.test_factorize:Net")
    assert {x["module"] for x in out["layers"]} == {"conv", "fc1", "fc2"}
    assert {s["module"]: s["reason"] for s in out["skipped"]}["dw"] == "grouped conv (groups=8) stays dense"
    # naming the grouped conv without --arch factorizes its weight, which the model cannot run:
    # loading it names the file and the layer
    run("factorize", str(p), "-o", str(tmp_path / "b.safetensors"), "--rank", "2", "--include", "dw")
    with pytest.raises(FormatError, match=r"factorized layer 'dw' is a grouped conv \(groups=8\) in the model") as e:
        load_model(tmp_path / "b.safetensors", arch="tests.test_factorize:Net")
    assert e.value.path == str(tmp_path / "b.safetensors")


def Encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1, enable_nested_tensor=False)


def test_arch_keeps_multihead_attention_out_proj_dense_and_the_model_runs(tmp_path: Path) -> None:
    # nn.MultiheadAttention reads out_proj.weight directly (a low-rank twin there cannot run);
    # the encoder layer's inference fast path reads linear1/2's weights, and takes its plain path
    enc = Encoder().eval()
    p = write(tmp_path, {k: v.contiguous() for k, v in enc.state_dict().items()}, "enc.safetensors")
    out = run("factorize", str(p), "-o", str(tmp_path / "f.safetensors"), "--rank", "4", "--arch", "tests.test_factorize:Encoder")
    assert {x["module"] for x in out["layers"]} == {"layers.0.linear1", "layers.0.linear2"}
    assert {s["module"]: s["reason"] for s in out["skipped"]}["layers.0.self_attn.out_proj"] == (
        "nn.MultiheadAttention reads this out_proj's weight directly: stays dense")
    low = load_model(tmp_path / "f.safetensors", arch="tests.test_factorize:Encoder").model.eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = low(x)
    run("factorize", str(tmp_path / "f.safetensors"), "--densify", "-o", str(tmp_path / "d.safetensors"))
    ref = Encoder().eval()
    ref.load_state_dict(load_file(tmp_path / "d.safetensors"))
    with torch.no_grad():
        assert torch.allclose(got, ref(x), atol=1e-5)


def test_model_folder_in_folder_out_and_bytes_repeatable(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "tokenizer_config.json").write_text("{}")
    for name in ("o1", "o2"):
        run("factorize", str(tmp_path / "bert"), "-o", str(tmp_path / name), "--ratio", "0.25")
    assert (tmp_path / "o1" / "tokenizer_config.json").is_file() and (tmp_path / "o1" / "config.json").is_file()
    assert (tmp_path / "o1" / "model.safetensors").read_bytes() == (tmp_path / "o2" / "model.safetensors").read_bytes()
    low = load_factorized(model, tmp_path / "o1")
    ids = torch.randint(0, 50, (2, 7))
    assert low(input_ids=ids).last_hidden_state.shape == (2, 7, 32)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    p = write(tmp_path, {"a.weight": spectrum_weight(40, 30)})
    out = run("factorize", str(p), "-o", str(tmp_path / "o.safetensors"), "--energy", "0.5", "--dry-run")
    assert out["dry_run"] and out["layers"][0]["rank"] == ranks.select_rank(torch.linalg.svdvals(spectrum_weight(40, 30)), ranks.RankRule("energy", 0.5)) == 4
    assert not (tmp_path / "o.safetensors").exists()


def test_budget_beats_uniform(tmp_path: Path) -> None:
    sd = {f"l{i}.weight": spectrum_weight(48 + 16 * i, 32, seed=i) * (1 + i) for i in range(4)}
    p = write(tmp_path, sd)
    total = sum(w.numel() for w in sd.values())
    out = run("factorize", str(p), "-o", str(tmp_path / "b.safetensors"), "--budget", "0.5", "--svd", "exact")
    assert out["factorized_params_after"] <= 0.5 * total
    err_budget = sum((x["rel_error"] ** 2) * sd[x["module"] + ".weight"].double().norm() ** 2 for x in out["layers"])
    uni = run("factorize", str(p), "-o", str(tmp_path / "u.safetensors"), "--ratio", "0.34", "--svd", "exact")
    assert uni["factorized_params_after"] <= 0.5 * total
    err_uni = sum((x["rel_error"] ** 2) * sd[x["module"] + ".weight"].double().norm() ** 2 for x in uni["layers"])
    assert err_budget < err_uni


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "--rank must be a positive integer, got 0"),
        (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5"),
        (["--rank", "2", "--ratio", "0.5"], "give exactly one rank option"),
        ([], "give exactly one rank option"),
        (["--rank", "2", "--include", "nothing*"], "--include 'nothing*' matches no tensor"),
    ],
)
def test_option_errors(tmp_path: Path, args: list[str], message: str) -> None:
    p = write(tmp_path, {"a.weight": spectrum_weight(10, 10)})
    res = runner.invoke(app, ["factorize", str(p), "-o", str(tmp_path / "o.safetensors"), *args])
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_nan_weight_named_and_nothing_written(tmp_path: Path) -> None:
    w = spectrum_weight(10, 10)
    w[3, 3] = float("nan")
    p = write(tmp_path, {"good.weight": spectrum_weight(10, 10), "bad.weight": w})
    res = runner.invoke(app, ["factorize", str(p), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"])
    assert res.exit_code == 1
    assert res.stderr.strip() == f"error: {p}: weight bad.weight holds NaN or Inf values; cannot factorize it"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.safetensors"]


def test_existing_output_needs_force(tmp_path: Path) -> None:
    p = write(tmp_path, {"a.weight": spectrum_weight(10, 10)})
    o = tmp_path / "o.safetensors"
    o.write_bytes(b"keep")
    res = runner.invoke(app, ["factorize", str(p), "-o", str(o), "--rank", "2"])
    assert res.exit_code == 1 and "output exists; pass --force" in res.stderr and o.read_bytes() == b"keep"
    run("factorize", str(p), "-o", str(o), "--rank", "2", "--force")
    assert "a.weight_u" in load_file(o)


def test_densify_takes_no_other_options(tmp_path: Path) -> None:
    p = write(tmp_path, {"l.weight": spectrum_weight(8, 6)})
    run("factorize", str(p), "-o", str(tmp_path / "f.safetensors"), "--rank", "2")
    res = runner.invoke(app, ["factorize", str(tmp_path / "f.safetensors"), "--densify", "-o", str(tmp_path / "d.safetensors"),
                              "--dry-run", "--rank", "3", "--include", "l*"])
    assert res.exit_code == 1 and res.stderr.strip() == (
        "error: --densify turns every factorized layer back into W = U·V and takes no --rank, --include, --dry-run")
    assert not (tmp_path / "d.safetensors").exists()


def test_arch_must_fit_the_weights(tmp_path: Path) -> None:
    """--arch gave factorize the conv groups of a model the weights were not from, unchecked."""
    save_file({"fc1.weight": torch.randn(16, 8), "fc2.weight": torch.randn(4, 16)}, tmp_path / "mlp.safetensors")
    res = CliRunner().invoke(app, ["factorize", str(tmp_path / "mlp.safetensors"), "--arch", "lorasurgeon.zoo:digits_cnn",
                                   "--rank", "2", "-o", str(tmp_path / "f.safetensors")])
    assert res.exit_code == 1 and res.stderr == (f"error: {tmp_path / 'mlp.safetensors'}: the weights are not "
                                                 "lorasurgeon.zoo:digits_cnn's: 2 it does not have, e.g. 'fc1.weight'\n")
    assert not (tmp_path / "f.safetensors").exists()


def test_allowed_unmatched_pattern_is_a_warning_on_stderr_and_in_the_result(tmp_path: Path) -> None:
    p = write(tmp_path, {"a.weight": spectrum_weight(40, 30), "b.weight": spectrum_weight(40, 30, seed=1)})
    args = ["factorize", str(p), "-o", str(tmp_path / "o.safetensors"), "--rank", "4", "--include", "a*",
            "--include", "zz*", "--exclude", "nothing*", "--allow-unmatched"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.stderr
    want = ["--include 'zz*' matches no tensor (allowed by --allow-unmatched)",
            "--exclude 'nothing*' matches no tensor (allowed by --allow-unmatched)"]
    assert json.loads(res.stdout)["warnings"] == want
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")] == [f"warning: {w}" for w in want]
    assert [x["module"] for x in json.loads(res.stdout)["layers"]] == ["a"]
    res = runner.invoke(app, [*args[:-1], "--force"])  # without --allow-unmatched: an error, nothing written
    assert res.exit_code == 1 and "--include 'zz*', --exclude 'nothing*' matches no tensor" in res.stderr
