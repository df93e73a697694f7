"""data, model resolution, attach (LoRA training, PEFT loading, determinism, resume), distill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorasurgeon.cli.app import app
from lorasurgeon.data import load_dataset, split
from lorasurgeon.errors import FormatError, InputNotFoundError, InvalidOptionError
from lorasurgeon.finetune import attach_lora
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.nn.models import load_model
from lorasurgeon.train import TrainOptions
from lorasurgeon.zoo import mlp

runner = CliRunner()
ARCH = "lorasurgeon.zoo:mlp"


def run(*args: str, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == code, (res.stdout, res.stderr)
    return json.loads(res.stdout) if res.stdout.strip() else {}


def test_digits_split_is_deterministic() -> None:
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.inputs["x"].shape == (1797, 1, 8, 8) and ds.num_classes == 10
    a = split(ds, 0.1, seed=3)
    b = split(ds, 0.1, seed=3)
    c = split(ds, 0.1, seed=4)
    assert torch.equal(a[1].labels, b[1].labels) and len(a[1]) == 180 and len(a[0]) == 1617
    assert not torch.equal(a[1].inputs["x"], c[1].inputs["x"])
    assert torch.equal(load_dataset("digits-inverted").inputs["x"], 1 - ds.inputs["x"])


@pytest.mark.parametrize("name", ["digits-shifted", "digits-noisy", "digits-contrast"])
def test_mild_digits_domain_sets(name: str) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images.astype(np.float32) / 16.0  # (1797, 8, 8), independent of lorasurgeon.data
    if name == "digits-shifted":  # 1 px down, 1 px right, zero fill
        want = np.zeros_like(img)
        for i in range(7):
            for j in range(7):
                want[:, i + 1, j + 1] = img[:, i, j]
    elif name == "digits-noisy":  # x + 0.4 * N(0, 1) from a seed-0 torch generator, not clipped
        noise = torch.randn((1797, 1, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()[:, 0]
        want = img + 0.4 * noise
        assert 0.95 < float(noise.std()) < 1.05 and want.min() < 0 and want.max() > 1
    else:
        want = 0.5 * img + 0.25
    ds = load_dataset(name)
    clean = load_dataset("digits")
    assert ds.inputs["x"].shape == (1797, 1, 8, 8) and ds.inputs["x"].dtype == torch.float32
    assert torch.equal(ds.labels, clean.labels) and ds.classes == clean.classes and ds.name == name
    np.testing.assert_allclose(ds.inputs["x"][:, 0].numpy(), want, rtol=0, atol=1e-6)
    assert torch.equal(load_dataset(name).inputs["x"], ds.inputs["x"])  # deterministic
    assert not torch.equal(ds.inputs["x"], clean.inputs["x"])
    # same order as digits, so seeded splits line up across domains
    assert torch.equal(split(ds, 0.1, seed=0, test_fraction=0.2)[2].labels, split(clean, 0.1, seed=0, test_fraction=0.2)[2].labels)


def test_tables_and_tensor_files(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("text,label\nhello,pos\nbad day,neg\nok,pos\n")
    ds = load_dataset(tmp_path / "t.csv")
    assert ds.extra["texts"] == ["hello", "bad day", "ok"] and ds.classes == ["neg", "pos"] and ds.labels.tolist() == [1, 0, 1]
    (tmp_path / "t.jsonl").write_text('{"body": "a", "y": 2}\n{"body": "b", "y": 10}\n')
    ds = load_dataset(tmp_path / "t.jsonl", text_column="body", label_column="y")
    assert ds.classes == ["2", "10"] and ds.labels.tolist() == [0, 1]
    with pytest.raises(FormatError, match="no column 'text'"):
        load_dataset(tmp_path / "t.jsonl")
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3), np.float32), y=np.arange(5))
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.kind == "tensor" and ds.labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputNotFoundError, match="named sets: digits, digits-inverted"):
        load_dataset("nope")


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for c, v in (("cat", 0), ("dog", 255)):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), v, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(tmp_path, image_size=4)
    assert ds.inputs["x"].shape == (4, 3, 4, 4) and ds.classes == ["cat", "dog"] and float(ds.inputs["x"][3].mean()) == 1.0


def _base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = mlp()
    p = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, p)
    return p


def test_attach_trains_and_peft_loads(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = _base(tmp_path)
    out = run("attach", str(base), "--arch", ARCH, "--data", "digits", "-o", str(tmp_path / "ad"), "--target", "fc*",
              "--rank", "4", "--alpha", "8", "--head", "classifier", "--epochs", "2", "--lr", "0.01", "--batch-size", "64",
              "--dropout", "0.05")
    assert out["targets"] == ["fc1", "fc2"] and out["heads"] == ["classifier"]
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert out["val_accuracy"] > out["val_accuracy_before"] + 0.5
    assert (tmp_path / "ad" / "metrics.json").is_file()
    # peft loads our adapter and reproduces our trained model
    lm = load_model(base, arch=ARCH)
    pm = peft.PeftModel.from_pretrained(lm.model, str(tmp_path / "ad")).eval()
    x = load_dataset("digits").inputs["x"][:300]
    acc = (pm(x).argmax(-1) == load_dataset("digits").labels[:300]).float().mean()
    assert acc > 0.6  # the base is an untrained MLP: only LoRA (rank 4) and the head learned
    merged = run("merge", str(base), str(tmp_path / "ad"), "-o", str(tmp_path / "m.safetensors"))
    assert merged["replaced"] == ["classifier.bias", "classifier.weight"]
    mm = load_model(tmp_path / "m.safetensors", arch=ARCH).model
    assert torch.allclose(mm(x), pm(x), atol=1e-5)


def test_attach_is_byte_identical_and_resumable(tmp_path: Path) -> None:
    base = _base(tmp_path)
    kw = dict(arch=ARCH, targets=["fc*"], rank=2, heads=["classifier"])
    attach_lora(base, "digits", tmp_path / "a", opts=TrainOptions(epochs=2, lr=0.01, batch_size=128), **kw)
    attach_lora(base, "digits", tmp_path / "b", opts=TrainOptions(epochs=2, lr=0.01, batch_size=128), **kw)
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f

    calls = []

    def interrupt(done: int, total: int, item: str) -> None:
        calls.append(item)
        if item.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attach_lora(base, "digits", tmp_path / "c", opts=TrainOptions(epochs=2, lr=0.01, batch_size=128), progress=interrupt, **kw)
    assert not (tmp_path / "c").exists() and (tmp_path / ".c.train-state.pt").is_file()
    # a resume must continue the same run: other options are refused, the saved state kept
    with pytest.raises(InvalidOptionError, match=r"--resume: the saved training state was made with other options "
                                                 r"\(differing: alpha, train\.epochs\)"):
        attach_lora(base, "digits", tmp_path / "c", opts=TrainOptions(epochs=3, lr=0.01, batch_size=128), resume=True,
                    **{**kw, "alpha": 4.0})
    res = attach_lora(base, "digits", tmp_path / "c", opts=TrainOptions(epochs=2, lr=0.01, batch_size=128), resume=True, **kw)
    assert res.fit["resumed_from"] == 1  # the result says so; the files are those of an uninterrupted run
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.json"):
        assert (tmp_path / "c" / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), f
    assert not (tmp_path / ".c.train-state.pt").exists()


def test_attach_errors(tmp_path: Path) -> None:
    base = _base(tmp_path)
    res = runner.invoke(app, ["attach", str(base), "--arch", ARCH, "--data", "digits", "-o", str(tmp_path / "x"), "--target", "conv*"])
    assert res.exit_code == 1 and "--target 'conv*' matches no Linear, Conv2d or Conv1D module" in res.stderr
    res = runner.invoke(app, ["attach", str(base), "--arch", "nope.module:f", "--data", "digits", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "cannot import 'nope.module'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_only_the_process_that_writes_the_output_removes_the_training_state(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun rank 0 alone writes the output; another worker that finishes must not delete
    the state rank 0 still needs if its write fails (a --resume would then start over)."""
    from lorasurgeon import finetune

    base = _base(tmp_path)
    run("factorize", str(base), "-o", str(tmp_path / "s.safetensors"), "--rank", "6", "--include", "fc*")
    monkeypatch.setattr(finetune, "is_main_process", lambda: False)
    finetune.distill_student(base, tmp_path / "s.safetensors", "digits", tmp_path / "d.safetensors", arch=ARCH,
                             opts=TrainOptions(epochs=1, batch_size=128))
    assert not (tmp_path / "d.safetensors").exists() and (tmp_path / ".d.safetensors.train-state.pt").is_file()


def test_distill_improves_agreement(tmp_path: Path) -> None:
    base = tmp_path / "teacher.safetensors"
    run("attach", "--arch", ARCH, "--data", "digits", "--full", "-o", str(base), "--epochs", "3", "--lr", "0.003", "--batch-size", "64")
    run("factorize", str(base), "-o", str(tmp_path / "s.safetensors"), "--rank", "6", "--include", "fc*")
    out = run("distill", "--teacher", str(base), "--student", str(tmp_path / "s.safetensors"), "--arch", ARCH,
              "--data", "digits", "-o", str(tmp_path / "d.safetensors"), "--epochs", "3", "--lr", "0.003", "--batch-size", "64",
              "--test-split", "0.2")
    assert out["loss"] == "kl"
    assert out["after"]["top1_agreement"] > out["before"]["top1_agreement"]
    assert out["after"]["kl"] < out["before"]["kl"]
    assert out["test"]["kl"] < out["test_before"]["kl"]  # the test split, before and after (never used for choosing)
    a, b = Checkpoint.open(tmp_path / "s.safetensors"), Checkpoint.open(tmp_path / "d.safetensors")
    assert a.names() == b.names()
    assert json.loads(a.metadata["lorasurgeon"])["layers"] == json.loads(b.metadata["lorasurgeon"])["layers"]
    assert not torch.equal(a.get("fc1.weight_u"), b.get("fc1.weight_u"))
    assert torch.equal(a.get("classifier.weight"), b.get("classifier.weight"))  # only the factors trained


def _torchrun() -> Path:
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    return torchrun


@pytest.mark.slow
@pytest.mark.parametrize("limit", [512, 500])  # 384 training examples (whole batches), 375 (the last batch short)
def test_two_process_training_matches_one_process(tmp_path: Path, limit: int) -> None:
    """torchrun with 2 CPU processes (gloo), batch 32 each, equals one process with batch 64,
    also when the last batch is short (each example weighs as in the one process's batch)."""
    import subprocess
    import sys

    torchrun = _torchrun()
    base = _base(tmp_path)
    common = [str(base), "--arch", ARCH, "--data", "digits", "--limit", str(limit), "--val-split", "0.25", "--target", "fc*",
              "--rank", "2", "--head", "classifier", "--epochs", "2", "--lr", "0.01", "--quiet"]
    ls = [sys.executable, "-m", "lorasurgeon", "attach"]
    one = subprocess.run([*ls, *common, "--batch-size", "64", "-o", str(tmp_path / "one"), "--json"], check=True,
                         capture_output=True, text=True)
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29533", "-m", "lorasurgeon", "attach",
                          *common, "--batch-size", "32", "-o", str(tmp_path / "two"), "--json"], check=True, timeout=600,
                         capture_output=True, text=True)
    from lorasurgeon.io.adapters import read_adapter

    a, b = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    for m in a.targets:
        assert torch.allclose(a.targets[m].B, b.targets[m].B, atol=1e-5)
        assert torch.allclose(a.targets[m].A, b.targets[m].A, atol=1e-5)
    # rank 0 alone prints: one JSON object, whose train loss is the whole split's (all-reduced)
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)
    for h1, h2 in zip(r1["fit"]["history"], r2["fit"]["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
    assert r2["fit"]["extra"] == {"dropped_batches_per_epoch": 0}


@pytest.mark.slow
def test_failures_under_torchrun_are_reported_once(tmp_path: Path) -> None:
    """Every worker meets a bad option: rank 0 alone reports it (one line, one JSON object), and
    commands that do not train refuse to run as several processes."""
    import subprocess

    torchrun = [str(_torchrun()), "--nproc-per-node", "2", "--master-port", "29534", "-m", "lorasurgeon"]
    base = _base(tmp_path)
    for _ in range(3):  # the order in which the workers fail varies
        r = subprocess.run([*torchrun, "attach", str(base), "--arch", ARCH, "--data", "digits", "--limit", "128",
                            "--target", "nomatch*", "-o", str(tmp_path / "a"), "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1
        assert json.loads(r.stdout)["error"]["kind"] == "unmatched"
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert errors == ["error: --target 'nomatch*' matches no Linear, Conv2d or Conv1D module; modules look like: fc1, "
                          "fc2, classifier"], r.stderr
    # a failure of one worker alone (here its model factory, during training it could be its shard's
    # data) is reported by that worker, with its rank, once; the others stay quiet
    (tmp_path / "rankfail.py").write_text(
        "import os\nfrom lorasurgeon.zoo import mlp\n\n\ndef ctor1():\n    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('boom on rank 1')\n    return mlp()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*torchrun, "attach", str(base), "--arch", "rankfail:ctor1", "--data", "digits", "--limit", "128",
                        "--target", "fc*", "-o", str(tmp_path / "f"), "--json"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        "error: rank 1: --arch factory ctor1() failed (ValueError: boom on rank 1)"], r.stderr
    assert json.loads(r.stdout)["error"]["rank"] == 1
    r = subprocess.run([*torchrun, "inspect", str(base), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["kind"] == "invalid_option"
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        "error: inspect runs as one process; run it without torchrun (WORLD_SIZE=2): only attach and distill train "
        "across processes"]
    assert not (tmp_path / "a").exists()
    # --batch-size is per process: a state saved by one process does not resume under two
    kw = dict(arch=ARCH, targets=["fc*"], rank=2, heads=["classifier"])

    def interrupt(done: int, total: int, item: str) -> None:
        if item.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attach_lora(base, "digits", tmp_path / "c", opts=TrainOptions(epochs=2, lr=0.01, batch_size=128),
                    progress=interrupt, **kw)
    r = subprocess.run([*torchrun, "attach", str(base), "--arch", ARCH, "--data", "digits", "--target", "fc*", "--rank", "2",
                        "--head", "classifier", "--epochs", "2", "--lr", "0.01", "--batch-size", "128", "-o",
                        str(tmp_path / "c"), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "made with other options (differing: world_size)" in r.stderr, r.stderr
    assert (tmp_path / ".c.train-state.pt").is_file()


def test_training_option_values_are_checked(tmp_path: Path) -> None:
    base = _base(tmp_path)
    for opt, val, msg in (("--alpha", "nan", "--alpha must be a positive number, got nan"),
                          ("--alpha", "-4", "--alpha must be a positive number, got -4"),
                          ("--weight-decay", "-1", "--weight-decay must be a number >= 0, got -1"),
                          ("--max-length", "1", "--max-length must be at least 2, got 1")):
        res = runner.invoke(app, ["attach", str(base), "--arch", ARCH, "--data", "digits", opt, val, "-o", str(tmp_path / "x")])
        assert res.exit_code == 1 and res.stderr.strip() == f"error: {msg}", res.stderr
    assert not (tmp_path / "x").exists()


def test_feature_taps_loss_equals_direct_computation() -> None:
    """_FeatureTaps pairs factorized student layers with same-named teacher layers, masks padding."""
    from lorasurgeon.finetune import _FeatureTaps
    from lorasurgeon.nn.layers import LowRankLinear

    torch.manual_seed(0)
    teacher = mlp()
    student = mlp()
    student.load_state_dict(teacher.state_dict())
    w = teacher.fc2.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    student.fc2 = LowRankLinear.from_linear(teacher.fc2, 8)
    with torch.no_grad():
        student.fc2.weight_u.copy_(u[:, :8] * s[:8])
        student.fc2.weight_v.copy_(vh[:8])
        student.fc2.bias.copy_(teacher.fc2.bias)
    taps = _FeatureTaps(teacher, student)
    x = torch.randn(5, 1, 8, 8)
    taps.on = True
    student(x)
    with torch.no_grad():
        teacher(x)
    taps.on = False
    got = taps.loss(None)
    h = torch.relu(teacher.fc1(x.flatten(1)))
    ys, yt = student.fc2(h), teacher.fc2(h)
    want = (ys - yt).pow(2).sum() / yt.pow(2).sum()
    assert torch.allclose(got, want, rtol=1e-5) and got.requires_grad
    # a (batch, tokens) mask drops padded positions from both sums
    ys3, yt3 = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
    taps.s, taps.t = {"fc2": ys3}, {"fc2": yt3}
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    keep = mask.bool()
    want = (ys3[keep] - yt3[keep]).pow(2).sum() / yt3[keep].pow(2).sum()
    assert torch.allclose(taps.loss(mask), want, rtol=1e-6)
    taps.remove()
    student(x)
    assert taps.s == {}  # hooks removed


def test_distill_feature_loss_trains_layers_toward_the_teacher(tmp_path: Path) -> None:
    base = tmp_path / "teacher.safetensors"
    run("attach", "--arch", ARCH, "--data", "digits", "--full", "-o", str(base), "--epochs", "2", "--lr", "0.003", "--batch-size", "64")
    run("factorize", str(base), "-o", str(tmp_path / "s.safetensors"), "--rank", "4", "--include", "fc*")
    common = ["--teacher", str(base), "--student", str(tmp_path / "s.safetensors"), "--arch", ARCH, "--data", "digits",
              "--epochs", "2", "--lr", "0.003", "--batch-size", "64"]
    out = run("distill", *common, "-o", str(tmp_path / "d.safetensors"), "--feature-loss", "1")
    assert out["after"]["top1_agreement"] > out["before"]["top1_agreement"]
    with Checkpoint.open(tmp_path / "d.safetensors") as ck:
        assert json.loads(ck.metadata["lorasurgeon"])["options"]["feature_loss"] == 1.0
    res = runner.invoke(app, ["distill", *common, "-o", str(tmp_path / "e.safetensors"), "--feature-loss", "-1"])
    assert res.exit_code == 1 and res.stderr.strip() == "error: --feature-loss must be >= 0, got -1"
    assert not (tmp_path / "e.safetensors").exists()


def test_lr_schedule_factors(tmp_path: Path) -> None:
    from lorasurgeon.train import lr_factor

    assert [lr_factor(k, 10, "constant", 0.0) for k in range(10)] == [1.0] * 10
    assert [lr_factor(k, 10, "constant", 0.2) for k in range(3)] == [0.5, 1.0, 1.0]  # 2 warm-up steps
    assert [round(lr_factor(k, 10, "linear", 0.0), 6) for k in (0, 5, 9)] == [1.0, 0.5, 0.1]
    assert [round(lr_factor(k, 12, "cosine", 1 / 6), 6) for k in (0, 1, 2, 7)] == [0.5, 1.0, 1.0, 0.5]
    res = runner.invoke(app, ["attach", "--arch", ARCH, "--schedule", "step", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.stderr.strip() == "error: --schedule must be one of constant, linear, cosine, got 'step'"


def test_schedule_applies_and_resume_restores_it(tmp_path: Path) -> None:
    """A cosine schedule with warm-up: an interrupted run resumed equals the uninterrupted one."""
    base = _base(tmp_path)
    kw = dict(arch=ARCH, targets=["fc*"], rank=2, heads=["classifier"])
    o = dict(epochs=2, lr=0.01, batch_size=128, schedule="cosine", warmup=0.3)
    attach_lora(base, "digits", tmp_path / "a", opts=TrainOptions(**o), **kw)
    attach_lora(base, "digits", tmp_path / "const", opts=TrainOptions(epochs=2, lr=0.01, batch_size=128), **kw)
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a != (tmp_path / "const" / "adapter_model.safetensors").read_bytes()

    def interrupt(done: int, total: int, item: str) -> None:
        if item.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attach_lora(base, "digits", tmp_path / "c", opts=TrainOptions(**o), progress=interrupt, **kw)
    attach_lora(base, "digits", tmp_path / "c", opts=TrainOptions(**o), resume=True, **kw)
    assert (tmp_path / "c" / "adapter_model.safetensors").read_bytes() == a


@pytest.mark.parametrize(("name", "text", "message"), [
    ("short.csv", "text,label\nhello,pos\nno label here\nok,neg\n", r"^row 2 has no 'label' value \(--label-column\)$"),
    ("empty.csv", "text,label\nhello,pos\nbad day,\n", r"^row 2 has no 'label' value"),
    ("t.jsonl", '{"text": "a", "label": 1}\n\n{"label": 0}\n', r"^line 3 has no 'text' value \(--text-column\)$"),
    ("n.jsonl", '{"text": "a", "label": 1}\n{"text": {"a": 1}, "label": 0}\n', r"^line 2: 'text' is a JSON dict, not a value$"),
])
def test_table_rows_without_a_value_are_refused(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(FormatError, match=message):
        load_dataset(tmp_path / name)


def test_table_without_a_label_column_is_unlabelled(tmp_path: Path) -> None:
    (tmp_path / "u.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')  # for distill and calibration
    assert load_dataset(tmp_path / "u.jsonl").labels is None


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((4, 3), np.float32), "y": np.array(["0", "1", "0", "1"])},
     r"^'y' holds text \(dtype <U1\); a tensor file holds real numbers \(text goes in a \.csv or \.jsonl file\)$"),
    ({"x": np.array(["a", "b"]), "y": np.arange(2)}, r"^'x' holds text"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.array([0, 1.5, 2, 3])}, r"^'y' holds values that are not whole numbers"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.zeros((4, 2), np.int64)}, r"^'y' has shape \[4, 2\]; it must be one class id per row"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.array([0, -1, 2, 3])}, r"^'y' holds a negative label \(-1\)"),
])
def test_tensor_file_label_and_dtype_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(FormatError, match=message):
        load_dataset(tmp_path / "d.npz")


def test_tensor_file_whole_float_labels_are_class_ids(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2), np.float32), y=np.array([2.0, 0.0, 1.0]))
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [2, 0, 1]


def test_image_folder_keeps_grayscale_as_one_channel(tmp_path: Path) -> None:
    from PIL import Image

    for c, v in (("a", 10), ("b", 200)):
        (tmp_path / "g" / c).mkdir(parents=True)
        Image.fromarray(np.full((5, 5), v, np.uint8), mode="L").save(tmp_path / "g" / c / "0.png")
    ds = load_dataset(tmp_path / "g")
    assert ds.inputs["x"].shape == (2, 1, 5, 5)
    assert torch.equal(ds.inputs["x"][1], torch.full((1, 5, 5), 200 / 255.0))
    # one colour image among grey ones: everything is read as RGB (grey repeated in 3 channels)
    Image.fromarray(np.full((5, 5, 3), 30, np.uint8)).save(tmp_path / "g" / "a" / "1.png")
    ds = load_dataset(tmp_path / "g")
    assert ds.inputs["x"].shape == (3, 3, 5, 5) and torch.equal(ds.inputs["x"][0], torch.full((3, 5, 5), 10 / 255.0))


def test_attach_refuses_data_the_model_cannot_take(tmp_path: Path) -> None:
    base = _base(tmp_path)
    np.savez(tmp_path / "big.npz", x=np.zeros((40, 64), np.float32), y=np.arange(40) % 15)
    res = runner.invoke(app, ["attach", str(base), "--arch", ARCH, "--data", str(tmp_path / "big.npz"), "-o",
                              str(tmp_path / "x"), "--target", "fc*", "--quiet"])
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'big.npz'}: labels run up to 14 but the model's head has 10 outputs (classes 0 to 9)"]
    np.savez(tmp_path / "u8.npz", x=np.zeros((40, 64), np.uint8), y=np.arange(40) % 10)
    res = runner.invoke(app, ["attach", str(base), "--arch", ARCH, "--data", str(tmp_path / "u8.npz"), "-o",
                              str(tmp_path / "x"), "--target", "fc*", "--quiet"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path / 'u8.npz'}: the model cannot take this dataset's inputs "
                               "(x uint8 [64] per example): ")
    assert not (tmp_path / "x").exists()


def test_attach_and_distill_need_an_output(tmp_path: Path) -> None:
    for argv in (["attach", "m.safetensors", "--arch", ARCH], ["distill", "--teacher", "t", "--student", "s"]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and "Missing option '--output' / '-o'" in res.stderr


def test_image_size_resizes_tensor_images_and_refuses_other_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "i.npz", x=np.ones((2, 1, 8, 8), np.float32), y=np.arange(2))
    assert load_dataset(tmp_path / "i.npz", image_size=4).inputs["x"].shape == (2, 1, 4, 4)
    np.savez(tmp_path / "f.npz", x=np.ones((2, 8), np.float32))
    with pytest.raises(InvalidOptionError, match="^--image-size applies to images; 'f.npz' holds tensor data$"):
        load_dataset(tmp_path / "f.npz", image_size=4)
    (tmp_path / "t.csv").write_text("text\nhello\n")
    with pytest.raises(InvalidOptionError, match="'t.csv' holds text data"):
        load_dataset(tmp_path / "t.csv", image_size=4)


def _tiny_bert(tmp_path: Path, name: str, num_labels: int | None) -> Path:
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))  # (the fast one maps every word to [UNK] in transformers 5)
    cfg = transformers.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=num_labels or 2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg) if num_labels else transformers.BertModel(cfg)
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_attach_head_count_and_no_head_errors(tmp_path: Path) -> None:
    cls, enc = _tiny_bert(tmp_path, "cls", 2), _tiny_bert(tmp_path, "enc", None)
    (tmp_path / "three.csv").write_text("text,label\n" + "".join(f"a b,{'xyz'[i % 3]}\n" for i in range(30)))
    res = runner.invoke(app, ["attach", str(cls), "--data", str(tmp_path / "three.csv"), "-o", str(tmp_path / "x"), "--quiet"])
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'three.csv'}: the data has 3 classes but the model's classification head has 2 outputs "
        "(train from a model folder without a head to get a new one)"]
    res = runner.invoke(app, ["attach", str(enc), "--data", str(tmp_path / "three.csv"), "--no-head", "-o", str(tmp_path / "x"),
                              "--quiet"])
    assert res.exit_code == 1 and "--no-head: the model folder has no classification head of its own" in res.stderr
    assert not (tmp_path / "x").exists()


def test_attach_warns_when_the_rank_is_not_low(tmp_path: Path) -> None:
    base = _base(tmp_path)
    res = runner.invoke(app, ["attach", str(base), "--arch", ARCH, "--data", "digits", "--limit", "100", "--target", "fc*",
                              "--rank", "64", "--head", "classifier", "--epochs", "1", "-o", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.stderr
    w = json.loads(res.stdout)["extra"]["warnings"]
    assert w == ["--rank 64 is at least the full rank of 1 adapted module(s) (e.g. fc1: rank at most 64): LoRA there is "
                 "no low-rank update and trains more parameters than a full one"]
    assert f"warning: {w[0]}" in res.stderr


def test_limits_and_splits_that_leave_nothing_to_train(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="^--limit must be at least 1, got 0$"):
        load_dataset("digits", limit=0)
    with pytest.raises(InvalidOptionError, match="^digits has 1 example\\(s\\): none left to train on after 1 for validation and 0 for test$"):
        split(load_dataset("digits", limit=1), 0.1, 0)
    with pytest.raises(InvalidOptionError, match=r"^--val-split must be in \(0, 1\), got 0$"):
        split(load_dataset("digits", limit=10), 0.0, 0)


def test_merging_a_new_head_makes_a_classifier_folder(tmp_path: Path) -> None:
    """attach on a bare encoder adds a head (modules_to_save); merged into the encoder's folder, the
    result must be the classifier's folder, or transformers and export would drop the head."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    enc = _tiny_bert(tmp_path, "enc", None)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{'a b' if i % 3 else 'c'} a,{'xyz'[i % 3]}\n" for i in range(30)))
    run("attach", str(enc), "--data", str(tmp_path / "d.csv"), "--rank", "2", "--epochs", "1", "-o", str(tmp_path / "ad"))
    out = run("merge", str(enc), str(tmp_path / "ad"), "-o", str(tmp_path / "m"))
    assert out["added"] == ["classifier.bias", "classifier.weight"] and out["extra"] == {"config": "BertForSequenceClassification"}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["id2label"] == {"0": "x", "1": "y", "2": "z"}
    tok = transformers.AutoTokenizer.from_pretrained(enc)
    x = tok(["a b c", "c"], padding=True, return_tensors="pt")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(enc, num_labels=3).eval()
    ref = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, ref(**x).logits, atol=1e-5)
    assert load_model(tmp_path / "m").has_head
    # export with the adapter merged on the fly builds the head too
    ort = pytest.importorskip("onnxruntime")
    out = run("export", str(enc), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "m.onnx"))
    assert [o["name"] for o in out["outputs"]] == ["logits"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    assert np.allclose(sess.run(None, feed)[0], ref(**x).logits.detach().numpy(), atol=1e-5)


def test_a_heads_own_class_names_decide_the_label_ids(tmp_path: Path) -> None:
    """attach numbered the data's classes by sorted name: with a head whose id2label is
    {0: 'pos', 1: 'neg'}, 'pos' examples were trained as output 1, which the config calls 'neg'."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]))
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, id2label={0: "pos", 1: "neg"},
                                  label2id={"pos": 0, "neg": 1})
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{'good good' if i % 2 else 'bad bad'},{'pos' if i % 2 else 'neg'}\n"
                                                             for i in range(60)))
    out = run("attach", str(tmp_path / "m"), "--data", str(tmp_path / "d.csv"), "--no-head", "--epochs", "10", "--lr", "0.03",
              "--rank", "2", "-o", str(tmp_path / "ad"))
    assert out["classes"] == ["pos", "neg"] and out["val_accuracy"] == 1.0
    run("merge", str(tmp_path / "m"), str(tmp_path / "ad"), "-o", str(tmp_path / "merged"))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        pred = model(**tok(["good good", "bad bad"], return_tensors="pt")).logits.argmax(-1).tolist()
    assert [model.config.id2label[p] for p in pred] == ["pos", "neg"]
    # names the head does not have are refused
    (tmp_path / "other.csv").write_text("text,label\n" + "".join(f"good,{'yes' if i % 2 else 'no'}\n" for i in range(20)))
    res = runner.invoke(app, ["attach", str(tmp_path / "m"), "--data", str(tmp_path / "other.csv"), "--no-head",
                              "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        "the data's labels ['no', 'yes'] are not classes of the model's head (pos, neg: config.json id2label); train "
        "from a model folder without a head to get a new one") and not (tmp_path / "x").exists()


def test_one_class_a_bom_csv_a_tiny_test_split_and_json_number_labels(tmp_path: Path) -> None:
    (tmp_path / "one.csv").write_text("text,label\n" + "a b,sport\n" * 10)
    enc = _tiny_bert(tmp_path, "enc", None)
    res = runner.invoke(app, ["attach", str(enc), "--data", str(tmp_path / "one.csv"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.stderr.strip().endswith("the data has one class ('sport'): a classifier needs at least two")
    assert not (tmp_path / "x").exists()
    # a CSV with a byte-order mark (Excel's): the first column is 'text', not '\ufefftext'
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\n" + b"a,x\nb,y\n" * 5)
    assert load_dataset(str(tmp_path / "bom.csv")).extra["texts"][:2] == ["a", "b"]
    # a test split asked for is never silently empty
    _, val, test = split(load_dataset("digits", limit=20), 0.1, 0, test_fraction=0.02)
    assert test is not None and len(test) == 1 and len(val) == 2
    # 1, 1.0 and "1" are one class in JSONL
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"text": "a", "label": v}) + "\n" for v in (1, 1.0, "1", 2, 2.0)))
    assert load_dataset(str(tmp_path / "n.jsonl")).classes == ["1", "2"]


def test_the_output_is_never_an_input_even_with_force(tmp_path: Path) -> None:
    """attach --data D.safetensors -o D.safetensors --force replaced the training set with model weights."""
    x = torch.randn(40, 64)
    save_file({"x": x, "y": torch.arange(40) % 2}, tmp_path / "d.safetensors")
    before = (tmp_path / "d.safetensors").read_bytes()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, tmp_path / "w.safetensors")
    for out, name in ((tmp_path / "d.safetensors", "d.safetensors"), (tmp_path / "w.safetensors", "w.safetensors")):
        res = runner.invoke(app, ["attach", str(tmp_path / "w.safetensors"), "--arch", ARCH, "--data", str(tmp_path / "d.safetensors"),
                                  "--full", "-o", str(out), "--force"])
        assert res.exit_code == 1 and res.stderr.strip().endswith(
            f"the output is the input {name!r}; inputs are never modified: choose another output")
    assert (tmp_path / "d.safetensors").read_bytes() == before


def test_attach_option_edges(tmp_path: Path) -> None:
    """--no-head kept the head out of the trained parameters but gave it LoRA; --arch without
    weights trained LoRA on a random model; a skipped --target typo said nothing."""
    cls = _tiny_bert(tmp_path, "cls", 2)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"a b,{'xy'[i % 2]}\n" for i in range(20)))
    out = run("attach", str(cls), "--data", str(tmp_path / "d.csv"), "--no-head", "--epochs", "1", "-o", str(tmp_path / "a"))
    assert out["heads"] == [] and not any(t.startswith("classifier") for t in out["targets"])
    out = run("attach", str(cls), "--data", str(tmp_path / "d.csv"), "--epochs", "1", "-t", "*query", "-t", "*qeury",
              "--allow-unmatched", "-o", str(tmp_path / "b"))
    assert out["extra"]["warnings"] == ["--target '*qeury' matches no Linear, Conv2d or Conv1D module: skipped (--allow-unmatched)"]
    res = runner.invoke(app, ["attach", "--arch", ARCH, "--data", "digits", "-o", str(tmp_path / "c")])
    assert res.exit_code == 1 and res.stderr.strip() == (
        "error: LoRA adapts a trained model: give its weights (attach WEIGHTS --arch ...); without weights only --full "
        "makes sense (training the model from its initialisation)")


def test_distill_refuses_what_it_cannot_compare_and_records_its_data(tmp_path: Path) -> None:
    teacher = tmp_path / "t.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, teacher)
    run("factorize", str(teacher), "-o", str(tmp_path / "s.safetensors"), "--rank", "4", "--include", "fc*")
    # another model's student: was an internal error (a tensor size mismatch deep in the loss)
    transformers = pytest.importorskip("transformers")
    a = _tiny_bert(tmp_path, "a", 2)
    cfg = transformers.BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "b")
    transformers.AutoTokenizer.from_pretrained(a).save_pretrained(tmp_path / "b")
    run("factorize", str(tmp_path / "b"), "-o", str(tmp_path / "bf"), "--ratio", "0.25")
    (tmp_path / "t.csv").write_text("text,label\n" + "a b c,x\n" * 10)
    res = runner.invoke(app, ["distill", "--teacher", str(a), "--student", str(tmp_path / "bf"), "--data", str(tmp_path / "t.csv"),
                              "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "the student is not a factorization of this teacher:" in res.stderr, res.stderr
    assert not (tmp_path / "x").exists()
    # KL on an encoder's embeddings: accepted before, with accuracies of argmax over embedding dimensions
    enc = _tiny_bert(tmp_path, "enc", None)
    run("factorize", str(enc), "-o", str(tmp_path / "ef"), "--ratio", "0.25")
    res = runner.invoke(app, ["distill", "--teacher", str(enc), "--student", str(tmp_path / "ef"), "--data", str(tmp_path / "t.csv"),
                              "--loss", "kl", "-o", str(tmp_path / "y")])
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        "--loss kl compares class probabilities, and this model outputs embeddings (no classification head): use --loss "
        "cosine (the default here) or mse")
    out = run("distill", "--teacher", str(teacher), "--student", str(tmp_path / "s.safetensors"), "--arch", ARCH,
              "--data", "digits", "--limit", "200", "--epochs", "1", "--train-bias-norm", "-o", str(tmp_path / "d.safetensors"))
    # every bias is trained (the dense classifier's too), not only the factorized layers'
    biases = sum(v.numel() for k, v in mlp().state_dict().items() if k.endswith(".bias"))
    factors = sum(v.numel() for k, v in Checkpoint.open(tmp_path / "s.safetensors").items() if k.endswith(("_u", "_v")))
    assert out["trainable_params"] == factors + biases
    prov = json.loads(Checkpoint.open(tmp_path / "d.safetensors").metadata["lorasurgeon"])
    assert prov["options"]["dataset"] == "digits" and prov["options"]["image_size"] is None
    assert out["fit"]["best_metric"] == max(h["val_metric"] for h in out["fit"]["history"])
    # the reported agreement is k/n itself (KL breaks ties far below the 6 decimals reported)
    assert out["fit"]["best_metric"] * 40 == pytest.approx(round(out["fit"]["best_metric"] * 40), abs=1e-8)


def test_full_fine_tune_folder_states_its_class_and_labels_and_extracts_against_its_base(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    enc = _tiny_bert(tmp_path, "enc", None)  # a bare BertModel: attach gives it a new head
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{('a a', 'b b', 'c c')[i % 3]},{'xyz'[i % 3]}\n" for i in range(60)))
    r = run("attach", str(enc), "--data", str(tmp_path / "d.csv"), "--full", "--epochs", "4", "--lr", "0.003", "--batch-size", "8",
            "-o", str(tmp_path / "ft"))
    assert r["fit"]["best_epoch"] > 0  # (else the starting weights are kept, and there is nothing to extract)
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "x", "1": "y", "2": "z"} and cfg["label2id"] == {"x": 0, "y": 1, "z": 2}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft")
    assert model.config.id2label[2] == "z"
    # and extract takes it against the bare base: the LoRA plus the head is the fine-tune
    r = run("extract", "--base", str(enc), "--tuned", str(tmp_path / "ft"), "--rank", "16", "--save-other", "-o", str(tmp_path / "ad"))
    assert r["layers"] and "classifier.weight" in r["saved_other"]


def test_a_worker_reports_its_own_failure_with_its_rank_and_a_peers_as_no_internal_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without rank 0's report (here: no torchrun store), a worker other than rank 0 prints its
    failure itself, with its rank; a gloo error after a peer stopped is no internal error."""
    import typer

    from lorasurgeon.cli.output import handle_errors
    from lorasurgeon.errors import MatchError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(typer.Exit):
        with handle_errors(True):
            raise MatchError("bad shard")
    out, err = capsys.readouterr()
    assert err == "error: rank 1: bad shard\n"
    assert json.loads(out) == {"error": {"kind": "unmatched", "message": "bad shard", "path": None, "rank": 1}}
    with pytest.raises(typer.Exit):
        with handle_errors(False):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: "
                               "Connection reset by peer")
    assert capsys.readouterr().err.startswith("error: rank 1: another process of this torchrun run stopped ([")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the same error is ours to explain
    with pytest.raises(typer.Exit):
        with handle_errors(False):
            raise RuntimeError("Connection reset by peer")
    assert capsys.readouterr().err.startswith("error: internal error (RuntimeError: Connection reset by peer)")


def test_a_failing_arch_factory_or_module_is_the_users_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "badarch.py").write_text("def boom():\n    raise ValueError('no such layer size')\n")
    (tmp_path / "brokenarch.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = _base(tmp_path)
    for arch, msg in (("badarch:boom", "error: --arch factory boom() failed (ValueError: no such layer size)"),
                      ("brokenarch:f", "error: --arch 'brokenarch:f': importing 'brokenarch' failed (RuntimeError: "
                                       "half-written module)")):
        res = runner.invoke(app, ["attach", str(base), "--arch", arch, "--data", "digits", "-o", str(tmp_path / "x")])
        assert res.exit_code == 1 and res.stderr.strip() == msg, res.stderr
    assert not (tmp_path / "x").exists()


def test_a_factorized_folder_of_a_headed_model_loads_bare_and_distills(tmp_path: Path) -> None:
    """A BertForMaskedLM (or LlamaForCausalLM) folder's tensors carry the base model's prefix
    (bert.*) beside the head (cls.*): its factorized folder failed to load ("does not match the
    model's module"), so export and distill refused it; distill also copied the untrained
    factors through when the names differed by that prefix."""
    transformers = pytest.importorskip("transformers")
    from lorasurgeon.factorize import densify_checkpoint, factorize_checkpoint
    from lorasurgeon.nn.models import load_model, model_outputs
    from lorasurgeon.ops.ranks import RankRule

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    assert any(k.startswith("bert.") for k in load_file(tmp_path / "mlm" / "model.safetensors"))
    factorize_checkpoint(tmp_path / "mlm", tmp_path / "f", rule=RankRule("rank", 3))
    densify_checkpoint(tmp_path / "f", tmp_path / "d")
    lm, dense = load_model(tmp_path / "f"), load_model(tmp_path / "d")
    assert type(lm.model).__name__ == "BertModel" and lm.factorized and all(not n.startswith("bert.") for n in lm.factorized)
    feed = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(model_outputs(lm, feed), model_outputs(dense, feed), atol=1e-5)
    # a student far from its teacher, so that training changes it (random tiny BERTs are near-lossless at rank 3)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f" / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    far = {k: v * 3 if k.endswith("weight_u") else v for k, v in load_file(tmp_path / "f" / "model.safetensors").items()}
    save_file(far, tmp_path / "f" / "model.safetensors", metadata=meta)
    (tmp_path / "t.csv").write_text("text\n" + "".join(f"{'a b c'[i % 3:]} a\n" for i in range(40)))
    res = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "mlm"), "--student", str(tmp_path / "f"), "--data",
                              str(tmp_path / "t.csv"), "--epochs", "3", "--lr", "1e-3", "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["after"]["mean_cosine"] > r["before"]["mean_cosine"]
    before, after = load_file(tmp_path / "f" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    u = "bert.encoder.layer.0.attention.self.query.weight_u"
    assert u in after and not torch.equal(before[u], after[u])  # the trained factors were written, under the file's names
    assert torch.equal(before["cls.predictions.transform.dense.weight_u"], after["cls.predictions.transform.dense.weight_u"])
    trained = load_model(tmp_path / "out")
    assert torch.equal(dict(trained.model.named_parameters())["encoder.layer.0.attention.self.query.weight_u"], after[u])
