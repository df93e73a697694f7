"""compose: exact methods against dense sums, SVD against Eckart–Young, TIES/pruning and 'linear'
against PEFT's own add_weighted_adapter, DARE determinism, error paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.compose import compose_adapters
from lorasurgeon.io.adapters import Adapter, LoraTarget, read_adapter, write_adapter
from lorasurgeon.ops import compose as ops

runner = CliRunner()
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

WEIGHTS = (0.7, -0.4, 1.3)


def run(*args: str, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return json.loads(res.stdout) if res.stdout else {}


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def delta_of(model, module: str, adapter: str = "default") -> torch.Tensor:
    """PEFT's own delta weight (scale included) of one module, fp64."""
    for name, mod in model.named_modules():
        if name.endswith(module) and hasattr(mod, "get_delta_weight") and adapter in mod.lora_A:
            return mod.get_delta_weight(adapter).detach().double()
    raise AssertionError(f"{module} not adapted by {adapter}")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapters made by PEFT (non-zero init): different ranks, alphas, patterns, one rslora;
    target sets overlap but differ (query in all; value only in a; key only in c; dense only in b)."""
    root = tmp_path_factory.mktemp("adapters")
    cfgs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"value": 5}),
        "b": dict(r=2, lora_alpha=3, target_modules=["query", "intermediate.dense"], use_rslora=True),
        "c": dict(r=4, lora_alpha=4, target_modules=["query", "key"]),
    }
    paths, deltas = {}, {}
    for i, (name, kw) in enumerate(cfgs.items()):
        base = tiny_bert()  # seeds 0: the same base weights for all
        torch.manual_seed(10 + i)  # different LoRA weights per adapter
        pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kw))
        paths[name] = root / name
        pm.save_pretrained(paths[name])
        deltas[name] = {m: delta_of(pm, m) for m in read_adapter(paths[name]).targets}
    return paths, deltas


def weighted_sum(deltas, names, weights) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n, w in zip(names, weights):
        for m, d in deltas[n].items():
            out[m] = out.get(m, torch.zeros_like(d)) + w * d
    return out


def dense(t: LoraTarget) -> torch.Tensor:
    return t.scale * (t.B.reshape(t.B.shape[0], -1).double() @ t.A.reshape(t.rank, -1).double())


def amax(x: torch.Tensor) -> float:
    return float(x.abs().max())


def wargs(weights) -> list[str]:
    return [x for w in weights for x in ("--weight", str(w))]


def test_cat_is_exact_and_loads_in_peft(tmp_path: Path, adapters) -> None:
    paths, deltas = adapters
    names = ("a", "b", "c")
    out = run("compose", *(str(paths[n]) for n in names), "--method", "cat", *wargs(WEIGHTS), "-o", str(tmp_path / "cat"))
    assert out["schema"] == "lorasurgeon.compose/1" and out["exact"] is True
    ref = weighted_sum(deltas, names, WEIGHTS)
    got = read_adapter(tmp_path / "cat")
    assert set(got.targets) == set(ref)
    rows = {x["module"]: x for x in out["layers"]}
    q = "encoder.layer.0.attention.self.query"
    assert rows[q]["rank"] == 4 + 2 + 4 and rows[q]["sources"] == 3 and rows[q]["rel_error"] == 0
    assert rows["encoder.layer.0.attention.self.value"]["rank"] == 2
    for m, t in got.targets.items():
        assert t.scale == pytest.approx(1.0) and got.use_rslora is False
        assert torch.allclose(dense(t), ref[m], atol=1e-6 * amax(ref[m])), m
    # PEFT loads it and merge_and_unload gives base + the weighted sum
    base = tiny_bert()
    merged = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "cat")).merge_and_unload()
    bsd, msd = base.state_dict(), merged.state_dict()
    for m, d in ref.items():
        assert torch.allclose(msd[f"{m}.weight"].double(), bsd[f"{m}.weight"].double() + d, atol=1e-5), m
    untouched = "encoder.layer.0.attention.output.dense.weight"
    assert torch.equal(msd[untouched], bsd[untouched])


def test_svd_full_rank_exact_and_low_rank_is_eckart_young(tmp_path: Path, adapters) -> None:
    paths, deltas = adapters
    names = ("a", "b", "c")
    ref = weighted_sum(deltas, names, WEIGHTS)
    out = run("compose", *(str(paths[n]) for n in names), "-m", "svd", "--rank", "16", *wargs(WEIGHTS), "-o", str(tmp_path / "full"))
    full = read_adapter(tmp_path / "full")
    for m, t in full.targets.items():
        assert torch.allclose(dense(t), ref[m], atol=1e-5 * amax(ref[m])), m
    q = "encoder.layer.0.attention.self.query"
    # the query stack has rank 10 < 16: every component is kept, no error
    assert {x["module"]: x["rank"] for x in out["layers"]}[q] == 10
    assert max(x["rel_error"] for x in out["layers"]) < 1e-6
    assert out["exact"] is True  # the rank sufficed everywhere

    out = run("compose", *(str(paths[n]) for n in names), "-m", "svd", "--rank", "3", *wargs(WEIGHTS), "-o", str(tmp_path / "r3"))
    assert out["exact"] is False and out["totals"]["max_rel_error"] > 0.01  # truncated: the best rank-3, not the sum
    r3 = read_adapter(tmp_path / "r3")
    rows = {x["module"]: x for x in out["layers"]}
    for m, t in r3.targets.items():
        U, S, Vh = torch.linalg.svd(ref[m])
        k = min(3, int((S > 1e-5 * S[0]).sum()))  # ref is an fp32 product: noise ~1e-7
        assert t.rank == k == rows[m]["rank"]
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert torch.allclose(dense(t), best, atol=1e-5 * float(S[0])), m
        assert torch.allclose(torch.linalg.svdvals(dense(t))[:k], S[:k], rtol=1e-5)
        err = math.sqrt(float((S[k:] ** 2).sum() / (S**2).sum()))
        assert rows[m]["rel_error"] == pytest.approx(err, rel=1e-4, abs=1e-7)
        # S went into B: A keeps orthonormal rows
        assert torch.allclose(t.A.double() @ t.A.double().T, torch.eye(k, dtype=torch.float64), atol=1e-5)


def test_ties_and_magnitude_prune_match_peft_svd_variants(tmp_path: Path, adapters) -> None:
    """Our ties / magnitude_prune at full rank equal PEFT's ties_svd / magnitude_prune_svd at full rank
    (weights applied where merge_utils applies them; sign elected on the unweighted trimmed deltas)."""
    paths, _ = adapters
    names = ("a", "b", "c")
    pm = peft.PeftModel.from_pretrained(tiny_bert(), str(paths["a"]), adapter_name="a")
    for n in names[1:]:
        pm.load_adapter(str(paths[n]), adapter_name=n)
    for method in ("ties", "magnitude_prune"):
        pm.add_weighted_adapter(list(names), list(WEIGHTS), method, combination_type=f"{method}_svd", svd_rank=16, density=0.5)
        run("compose", *(str(paths[n]) for n in names), "-m", method, "--density", "0.5", "--rank", "16", *wargs(WEIGHTS),
            "-o", str(tmp_path / method))
        got = read_adapter(tmp_path / method)
        for m, t in got.targets.items():
            want = delta_of(pm, m, method)
            assert torch.allclose(dense(t), want, atol=1e-5 * amax(want)), (method, m)


def test_peft_linear_equals_peft_and_warns(tmp_path: Path, adapters) -> None:
    paths, deltas = adapters
    pm = peft.PeftModel.from_pretrained(tiny_bert(), str(paths["a"]), adapter_name="a")
    pm.load_adapter(str(paths["c"]), adapter_name="c")
    pm.add_weighted_adapter(["a", "c"], [0.7, -0.4], "lin", combination_type="linear")
    res = runner.invoke(app, ["compose", str(paths["a"]), str(paths["c"]), "-m", "peft_linear", "-w", "0.7", "-w", "-0.4",
                              "-o", str(tmp_path / "lin"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert "warning: peft_linear is PEFT's factor-wise 'linear' combination, not the weighted sum" in res.stderr
    out = json.loads(res.stdout)
    assert out["warnings"] and out["exact"] is False
    got = read_adapter(tmp_path / "lin")
    q = "encoder.layer.0.attention.self.query"
    for name, mod in pm.named_modules():
        if name.endswith(q) and hasattr(mod, "lora_A"):
            assert torch.allclose(got.targets[q].A, mod.lora_A["lin"].weight, atol=1e-6)
            assert torch.allclose(got.targets[q].B, mod.lora_B["lin"].weight, atol=1e-6)
            assert mod.scaling["lin"] == pytest.approx(got.targets[q].scale)
            break
    else:
        raise AssertionError("query not found")
    # it is not the weighted sum (cross terms), and the reported deviation says by how much
    exact = 0.7 * deltas["a"][q] - 0.4 * deltas["c"][q]
    dev = float((dense(got.targets[q]) - exact).norm() / exact.norm())
    assert dev > 0.05
    assert {x["module"]: x for x in out["layers"]}[q]["rel_error"] == pytest.approx(dev, rel=1e-4)
    # layers with one source are exact
    assert {x["module"]: x for x in out["layers"]}["encoder.layer.0.attention.self.value"]["rel_error"] < 1e-6
    # unequal ranks are refused
    res = runner.invoke(app, ["compose", str(paths["a"]), str(paths["b"]), "-m", "peft_linear", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "same rank" in res.stderr and not (tmp_path / "x").exists()


def test_ties_hand_computed_2x2() -> None:
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    d2 = torch.tensor([[5.0, -2.0], [1.0, -4.0]], dtype=torch.float64)
    # trim to 2 of 4 entries: d1 -> [[3,0],[0,2]], d2 -> [[5,0],[0,-4]]
    assert torch.equal(ops.magnitude_prune(d1, 0.5), torch.tensor([[3.0, 0], [0, 2.0]], dtype=torch.float64))
    # elected on the unweighted sum [[8,0],[0,-2]]: signs +,+,+,-; (0,0): both agree -> (3·1 + 5·0.5)/2;
    # (1,1): only d2 agrees -> −4·0.5/1; elsewhere nobody -> 0
    want = torch.tensor([[2.75, 0.0], [0.0, -2.0]], dtype=torch.float64)
    assert torch.equal(ops.ties_dense([d1, d2], [1.0, 0.5], 0.5), want)
    # through the registered method (factors B = d, A = I) and the recompression at full rank
    eye = torch.eye(2, dtype=torch.float64)
    tasks = [ops.Task(d1, eye, 1.0, 1.0), ops.Task(d2, eye, 1.0, 0.5)]
    c = ops.get_method("ties").fn(tasks, ops.LayerOptions(rank=2, density=0.5))
    assert torch.allclose(c.B @ c.A, want, atol=1e-12) and c.rel_error == pytest.approx(0.0, abs=1e-12)
    # scale folds into the task delta: B = d/2 at scale 2 is the same task
    tasks2 = [ops.Task(d1 / 2, eye, 2.0, 1.0), ops.Task(d2, eye, 1.0, 0.5)]
    assert torch.allclose(ops.get_method("ties").fn(tasks2, ops.LayerOptions(rank=2, density=0.5)).B @ c.A, c.B @ c.A)


def _mergekit_gta(deltas: list[torch.Tensor], weights: list[float], density: float, normalize: bool) -> torch.Tensor:
    """mergekit's GTATask.execute (merge_methods/generalized_task_arithmetic.py) with magnitude
    sparsification and consensus "sum", transcribed: sparsify each delta, weight, get_mask, mix."""
    def sparsify_magnitude(t: torch.Tensor) -> torch.Tensor:  # mergekit.sparsify.magnitude, rescale off
        k = int(density * t.numel())
        mask = torch.zeros_like(t)
        mask.view(-1)[torch.topk(t.abs().view(-1), k=k, largest=True).indices] = 1
        return t * mask

    ds = torch.stack([sparsify_magnitude(d) for d in deltas], dim=0)
    w = torch.tensor(weights, dtype=ds.dtype).view(-1, 1, 1)
    wd = ds * w
    sign = wd.sign()
    majority = (wd.sum(dim=0) >= 0).to(ds.dtype) * 2 - 1
    mask = sign == majority
    mixed = (wd * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor if normalize else mixed


def test_mergekit_ties_hand_computed_and_against_a_transcription() -> None:
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    d2 = torch.tensor([[5.0, -2.0], [1.0, -4.0]], dtype=torch.float64)
    # trimmed and weighted (1, 0.5): [[3,0],[0,2]] and [[2.5,0],[0,-2]]; signs elected on their sum
    # [[5.5,0],[0,0]]: + everywhere (0 counts as +). (0,0): both agree, (3+2.5)/(1+0.5); (1,1): d1 only, 2/1
    eye = torch.eye(2, dtype=torch.float64)
    tasks = [ops.Task(d1, eye, 1.0, 1.0), ops.Task(d2, eye, 1.0, 0.5)]
    c = ops.get_method("mergekit_ties").fn(tasks, ops.LayerOptions(rank=2, density=0.5))
    assert torch.allclose(c.B @ c.A, torch.tensor([[11 / 3, 0.0], [0.0, 2.0]], dtype=torch.float64), atol=1e-12)
    # one adapter added at 0.7 and subtracted at 0.4: mergekit's election sees the subtraction and
    # keeps only the added copy (normalised: τ); PEFT's ties averages both copies: (0.7 − 0.4)/2 τ
    tau = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    same = [ops.Task(tau, torch.eye(5, dtype=torch.float64), 1.0, 0.7), ops.Task(tau, torch.eye(5, dtype=torch.float64), 1.0, -0.4)]
    full = ops.LayerOptions(rank=5, density=1.0)
    for name, want in (("mergekit_ties", tau), ("mergekit_dare_ties", 0.7 * tau), ("ties", 0.15 * tau), ("dare_ties", 0.15 * tau)):
        c = ops.get_method(name).fn(same, full)
        assert torch.allclose(c.B @ c.A, want, atol=1e-10), name
    # random deltas, mixed-sign weights: equal to the transcription of mergekit
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(12, 9, dtype=torch.float64, generator=g) for _ in range(3)]
    ws = [0.7, -0.4, 1.3]
    tasks = [ops.Task(d, torch.eye(9, dtype=torch.float64), 1.0, wi) for d, wi in zip(deltas, ws, strict=True)]
    c = ops.get_method("mergekit_ties").fn(tasks, ops.LayerOptions(rank=9, density=0.4))
    assert torch.allclose(c.B @ c.A, _mergekit_gta(deltas, ws, 0.4, normalize=True), atol=1e-10)
    assert torch.allclose(ops.mergekit_ties_merge([ops.magnitude_prune(d, 0.4) for d in deltas], ws, normalize=False),
                          _mergekit_gta(deltas, ws, 0.4, normalize=False), atol=1e-12)
    # with every weight 1 the two TIES agree
    ones = [ops.Task(d, torch.eye(9, dtype=torch.float64), 1.0, 1.0) for d in deltas]
    a = ops.get_method("ties").fn(ones, ops.LayerOptions(rank=9, density=0.4))
    b = ops.get_method("mergekit_ties").fn(ones, ops.LayerOptions(rank=9, density=0.4))
    assert torch.allclose(a.B @ a.A, b.B @ b.A, atol=1e-10)


def test_ties_warns_about_negative_weights_and_zero_inputs_are_not_emptied(tmp_path: Path, adapters) -> None:
    paths, _ = adapters
    out = run("compose", str(paths["a"]), str(paths["c"]), "-m", "ties", "--density", "0.5", "-w", "1", "-w", "-0.5",
              "-o", str(tmp_path / "t"))
    assert out["warnings"] == ["ties elects each entry's sign on the unweighted deltas (PEFT's rule), so a negative --weight "
                               "does not subtract its adapter in the election; mergekit_ties elects on the weighted deltas"]
    out = run("compose", str(paths["a"]), str(paths["c"]), "-m", "mergekit_ties", "--density", "0.5", "-w", "1", "-w", "-0.5",
              "-o", str(tmp_path / "m"))
    assert out["warnings"] == []
    # a freshly initialised adapter (B = 0) composed alone: nothing was there to keep, so no density warning
    zero = tmp_path / "zero.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.randn(2, 6), "base_model.model.x.lora_B.weight": torch.zeros(4, 2)}, zero)
    out = run("compose", str(zero), "-m", "ties", "--density", "0.5", "-o", str(tmp_path / "z"))
    assert out["warnings"] == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_dtypes_report_what_the_cast_changed(tmp_path: Path, dtype: torch.dtype) -> None:
    """compose cat / svd and resize compute in fp32 and store in the inputs' dtype: the report
    used to say exact (error 0) for a file 1e-3 (bf16) off the weighted sum."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"a{i}.safetensors"
        save_file({"base_model.model.x.lora_A.weight": torch.randn(4, 24, generator=g).to(dtype),
                   "base_model.model.x.lora_B.weight": torch.randn(16, 4, generator=g).to(dtype)}, p)
        paths.append(p)
    want = sum(wi * dense(read_adapter(p).targets["x"]) for wi, p in zip((0.7, 0.3), paths))
    for method, extra in (("cat", []), ("svd", ["--rank", "8"])):
        out = run("compose", *map(str, paths), "-m", method, "-w", "0.7", "-w", "0.3", *extra, "-o", str(tmp_path / method))
        true = float((dense(read_adapter(tmp_path / method).targets["x"]) - want).norm() / want.norm())
        layer = out["layers"][0]
        assert layer["rel_error"] < 1e-6 and layer["cast_error"] == pytest.approx(true, rel=1e-2) and true > 1e-5
        assert out["exact"] is False and out["totals"]["max_cast_error"] == layer["cast_error"]
    out = run("resize", str(paths[0]), "--rank", "4", "-o", str(tmp_path / "r"))
    before = dense(read_adapter(paths[0]).targets["x"])
    true = float((dense(read_adapter(tmp_path / "r").targets["x"]) - before).norm() / before.norm())
    assert out["layers"][0]["fro_kept"] == 1.0 and out["layers"][0]["cast_error"] == pytest.approx(true, rel=1e-2)
    # fp32 inputs: nothing narrowed
    save_file({"base_model.model.x.lora_A.weight": torch.randn(4, 24), "base_model.model.x.lora_B.weight": torch.randn(16, 4)},
              tmp_path / "f.safetensors")
    out = run("compose", str(tmp_path / "f.safetensors"), "-m", "cat", "-o", str(tmp_path / "f"))
    assert out["layers"][0]["cast_error"] == 0.0 and out["exact"] is True


def test_dare_is_seeded_and_deterministic(tmp_path: Path, adapters) -> None:
    paths, deltas = adapters
    ins = [str(paths["a"]), str(paths["c"])]

    def make(name: str, seed: int, method: str = "dare_ties") -> bytes:
        run("compose", *ins, "-m", method, "--density", "0.6", "--seed", str(seed), "-o", str(tmp_path / name))
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    one = make("s1", 1)
    assert make("s1b", 1) == one
    assert (tmp_path / "s1" / "adapter_config.json").read_bytes() == (tmp_path / "s1b" / "adapter_config.json").read_bytes()
    assert make("s2", 2) != one
    # ties draws nothing at random: no seed (a --seed for it is refused, see the errors test)
    t1 = run("compose", *ins, "-m", "ties", "--density", "0.6", "-o", str(tmp_path / "t1"))
    run("compose", *ins, "-m", "ties", "--density", "0.6", "-o", str(tmp_path / "t9"))
    assert t1["seed"] is None
    assert (tmp_path / "t1" / "adapter_model.safetensors").read_bytes() == (tmp_path / "t9" / "adapter_model.safetensors").read_bytes()
    # DARE at density 1 keeps everything: dare_linear at full rank is the exact weighted sum
    run("compose", *ins, "-m", "dare_linear", "--density", "1", "--rank", "16", "-o", str(tmp_path / "d1"))
    ref = weighted_sum(deltas, ("a", "c"), (1.0, 1.0))
    for m, t in read_adapter(tmp_path / "d1").targets.items():
        assert torch.allclose(dense(t), ref[m], atol=1e-5 * amax(ref[m])), m


def test_dare_mask_statistics() -> None:
    x = torch.ones(200, 200, dtype=torch.float64)
    y = ops.dare(x, 0.3, ops.dare_generator(0, "m"))
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.3))
    assert torch.equal(y, ops.dare(x, 0.3, ops.dare_generator(0, "m")))
    assert not torch.equal(y, ops.dare(x, 0.3, ops.dare_generator(0, "other")))


def test_kohya_conv_svd_and_saved_modules(tmp_path: Path) -> None:
    """Conv (LoCon) targets through the svd path; kohya output; modules_to_save averaged; lora bias."""
    g = torch.Generator().manual_seed(0)
    files = []
    for i, (r, alpha) in enumerate([(4, 2.0), (3, 3.0)]):
        sd = {
            "lora_unet_c_conv.lora_down.weight": torch.randn(r, 5, 3, 3, generator=g),
            "lora_unet_c_conv.lora_up.weight": torch.randn(6, r, 1, 1, generator=g),
            "lora_unet_c_conv.alpha": torch.tensor(alpha),
        }
        p = tmp_path / f"k{i}.safetensors"
        save_file(sd, p)
        files.append(p)
    out = run("compose", *map(str, files), "-m", "svd", "--rank", "7", "-w", "0.5", "-w", "2", "--format", "kohya",
              "-o", str(tmp_path / "o.safetensors"))
    got = read_adapter(tmp_path / "o.safetensors").targets["lora_unet_c_conv"]
    assert got.A.shape == (6, 5, 3, 3) and got.B.shape == (6, 6, 1, 1)  # min(out=6, in·9, 4+3) components
    ins = [read_adapter(p).targets["lora_unet_c_conv"] for p in files]
    ref = 0.5 * dense(ins[0]) + 2 * dense(ins[1])
    assert torch.allclose(dense(got), ref, atol=1e-5 * amax(ref))
    assert out["layers"][0]["rank"] == 6

    # PEFT layout with modules_to_save and lora bias, written by our own writer
    def peft_ad(seed: int, head_value: float) -> Path:
        g2 = torch.Generator().manual_seed(seed)
        t = LoraTarget("lin", torch.randn(2, 4, generator=g2), torch.randn(3, 2, generator=g2), 4.0, 2.0,
                       bias=torch.randn(3, generator=g2))
        ad = Adapter("peft", {"lin": t}, {"head.weight": torch.full((2, 2), head_value), "head.bias": torch.zeros(2)})
        p = tmp_path / f"p{seed}"
        write_adapter(ad, p, "peft")
        return p

    p1, p2 = peft_ad(1, 1.0), peft_ad(2, 4.0)
    r = compose_adapters([p1, p2], tmp_path / "pc", "cat", weights=[1.0, 3.0])
    assert r.averaged == ["head.weight"] and r.modules_to_save == ["head.bias", "head.weight"] and r.warnings
    got2 = read_adapter(tmp_path / "pc")
    assert torch.allclose(got2.modules_to_save["head.weight"], torch.full((2, 2), (1.0 + 3 * 4.0) / 4))
    t1, t2 = read_adapter(p1).targets["lin"], read_adapter(p2).targets["lin"]
    assert torch.allclose(got2.targets["lin"].bias, 2.0 * t1.bias + 3 * 2.0 * t2.bias)  # Σ w_i s_i bias_i at scale 1


def test_dry_run_writes_nothing(tmp_path: Path, adapters) -> None:
    paths, _ = adapters
    out = run("compose", str(paths["a"]), str(paths["b"]), "-m", "svd", "--dry-run")
    assert out["dry_run"] is True and out["output"] is None and out["layers"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["weights", "method", "dora", "exists", "density", "rank_with_cat", "overflow", "peft_file", "seed_unused"])
def test_errors_exit_1_one_line_nothing_written(tmp_path: Path, adapters, case: str) -> None:
    paths, _ = adapters
    a, b = str(paths["a"]), str(paths["b"])
    dest = tmp_path / "out"
    args = {
        "weights": [a, b, "-w", "1", "-o", str(dest)],
        "method": [a, b, "-m", "nope", "-o", str(dest)],
        "density": [a, b, "-m", "ties", "-o", str(dest)],
        "rank_with_cat": [a, b, "--rank", "3", "-o", str(dest)],
        "exists": [a, b, "-o", str(dest)],
        "overflow": [a, b, "-w", "3e38", "-w", "1", "-o", str(dest)],  # finite, but times the scale past float32
        "peft_file": [a, b, "-o", str(tmp_path / "out.safetensors")],  # a PEFT adapter is a folder
        "seed_unused": [a, b, "-m", "svd", "--seed", "3", "-o", str(dest)],
    }.get(case)
    if case == "dora":
        pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True, init_lora_weights=False))
        pm.save_pretrained(tmp_path / "dora")
        args = [a, str(tmp_path / "dora"), "-o", str(dest)]
    if case == "exists":
        dest.mkdir()
        (dest / "keep.txt").write_text("x")
    res = runner.invoke(app, ["compose", *args])
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    expect = {"weights": "1 --weight value(s) for 2 adapters", "method": "choose one of cat, svd, ties",
              "dora": "composing DoRA is ill-posed", "exists": "output exists", "density": "needs --density",
              "rank_with_cat": "--rank does not apply", "overflow": "overflows float32",
              "peft_file": "a PEFT adapter is a folder, but -o out.safetensors names a file",
              "seed_unused": "--seed does not apply to --method svd, which draws nothing at random"}[case]
    assert expect in lines[0]
    if case == "exists":
        assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    else:
        assert not dest.exists()
    res = runner.invoke(app, ["compose", *args, "--json"])
    assert res.exit_code == 1 and "error" in json.loads(res.stdout)


def test_density_that_keeps_nothing_warns(tmp_path: Path, adapters) -> None:
    paths, _ = adapters
    out = run("compose", str(paths["a"]), str(paths["b"]), "-m", "ties", "--density", "1e-9", "-o", str(tmp_path / "z"))
    assert out["warnings"] and out["warnings"][0].startswith("--density 1e-09 keeps nothing of ")
    assert all(not bool(t.B.any()) for t in read_adapter(tmp_path / "z").targets.values())


def test_kohya_stems_take_the_module_names_of_the_other_inputs(tmp_path: Path, adapters) -> None:
    """A kohya file another tool wrote (stems only) composes with PEFT adapters when they name its layers."""
    from safetensors import safe_open

    paths, deltas = adapters
    run("convert", str(paths["c"]), "--to", "kohya", "-o", str(tmp_path / "c.safetensors"))
    with safe_open(tmp_path / "c.safetensors", "pt") as f:  # drop the module names lorasurgeon records
        save_file({k: f.get_tensor(k) for k in f.keys()}, tmp_path / "plain.safetensors")
    assert all("." not in m for m in read_adapter(tmp_path / "plain.safetensors").targets)
    # ours records its module names; the plain one takes them from the PEFT input that names every layer it has
    for other, kohya in (("a", "c.safetensors"), ("c", "plain.safetensors")):
        out = run("compose", str(paths[other]), str(tmp_path / kohya), "--method", "cat", "--weight", "0.5",
                  "--weight", "2", "-o", str(tmp_path / f"{other}-{kohya[:-12]}"))
        got = read_adapter(tmp_path / f"{other}-{kohya[:-12]}")
        ref = weighted_sum(deltas, (other, "c"), (0.5, 2.0))
        assert set(got.targets) == set(ref) and out["exact"] is True
        assert max(amax(dense(got.targets[m]) - ref[m]) for m in ref) < 1e-6
    # a stem that no other input names (key: only c targets it) cannot be mapped without the base
    res = runner.invoke(app, ["compose", str(paths["a"]), str(tmp_path / "plain.safetensors"), "--method", "cat",
                              "-o", str(tmp_path / "ac")])
    assert res.exit_code == 1 and not (tmp_path / "ac").exists()
    assert res.stderr.strip().endswith(
        "kohya name 'lora_encoder_layer_0_attention_self_key' is a lossy underscored stem that no other input names, "
        "and the other inputs use module paths; map it first: lorasurgeon convert FILE --to peft --base BASE")
