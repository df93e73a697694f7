"""CLI conventions: exit codes, one-line errors, JSON errors, version, python -m."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorasurgeon._version import __version__
from lorasurgeon.cli.app import app

runner = CliRunner()
LS = [sys.executable, "-m", "lorasurgeon"]


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"lorasurgeon {__version__}"


def test_python_dash_m_and_console_script(tmp_path: Path) -> None:
    out = subprocess.run([*LS, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"lorasurgeon {__version__}"
    exe = Path(sys.executable).parent / "lorasurgeon"
    if exe.exists():
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "inspect" in out.stdout


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.safetensors", "no such file or folder"),
        (lambda d: (d / "e.safetensors").write_bytes(b"") and None or d / "e.safetensors", "shorter than the 8-byte header"),
        (lambda d: (d / "x.h5").write_bytes(b"1") and None or d / "x.h5", "unknown checkpoint extension"),
        (lambda d: (d / "w").mkdir() or d / "w", "folder holds no weights"),
        (lambda d: (d / "j.pt").write_bytes(b"garbage!") and None or d / "j.pt", "not a valid PyTorch checkpoint"),
    ],
)
def test_errors_are_one_line_exit_1(tmp_path: Path, make, message: str) -> None:
    p = make(tmp_path)
    out = subprocess.run([*LS, "inspect", str(p)], capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {p}: ") and message in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_json_error_object(tmp_path: Path) -> None:
    p = tmp_path / "missing.safetensors"
    out = subprocess.run([*LS, "inspect", str(p), "--json"], capture_output=True, text=True)
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"error": {"kind": "not_found", "message": "no such file or folder", "path": str(p)}}


def test_debug_shows_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "LORASURGEON_DEBUG": "1"}
    out = subprocess.run([*LS, "inspect", str(tmp_path / "nope.pt")], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_usage_error_is_exit_2() -> None:
    res = runner.invoke(app, ["inspect"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["inspect", "x", "--rank", "abc"])
    assert res.exit_code == 2


def test_json_stdout_is_pure(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(8, 8)}, p)
    out = subprocess.run([*LS, "inspect", str(p), "--spectrum", "--json"], capture_output=True, text=True)
    assert out.returncode == 0
    assert json.loads(out.stdout)["spectrum"][0]["full_rank"] == 8


def test_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    """`lorasurgeon ... --json | true`: the reader is gone before the result is printed; the tool
    stops like a Unix tool killed by SIGPIPE (141), without an 'internal error' line."""
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.zeros(4, 4)}, p)
    proc = subprocess.Popen([*LS, "inspect", str(p), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader: the first write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


@pytest.mark.parametrize("args", [["inspect", "{p}"], ["inspect", "--help"], ["factorize", "{p}", "--rank", "2", "-o", "{out}"]],
                         ids=["table", "help", "factorize-log"])
def test_closed_stdout_without_json_is_141_too(tmp_path: Path, args: list[str]) -> None:
    """rich (tables) and click (--help) answer EPIPE with exit 1 and no message; ours is the quiet 141."""
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(64, 64)}, p)
    cmd = [a.format(p=p, out=tmp_path / "o.safetensors") for a in args]
    proc = subprocess.Popen([*LS, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "error" not in err


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_a_quiet_exit(tmp_path: Path, signame: str) -> None:
    """Ctrl-C or SIGTERM while the imports run (before any command code): exit 130 / 143 (a
    harness would otherwise see death by the signal), no traceback."""
    import signal
    import time

    sig = getattr(signal, signame)
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(8, 8)}, p)
    for delay in (0.15, 0.4):
        proc = subprocess.Popen([*LS, "inspect", str(p)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate()
        if proc.returncode == 0:  # finished before the signal (a fast machine): nothing to check
            continue
        assert proc.returncode == 128 + sig and b"Traceback" not in err, (delay, err[-300:])


def test_an_unwritable_stderr_changes_nothing(tmp_path: Path) -> None:
    # 2>/dev/full: logs are lost, the result and its --json object are not
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(16, 16)}, p)
    with open("/dev/full", "w") as full:
        ok = subprocess.run([*LS, "factorize", str(p), "--rank", "2", "-o", str(tmp_path / "f.safetensors"), "--json"],
                            stdout=subprocess.PIPE, stderr=full)
        bad = subprocess.run([*LS, "inspect", str(tmp_path / "missing.safetensors"), "--json"], stdout=subprocess.PIPE,
                             stderr=full)
    assert ok.returncode == 0 and json.loads(ok.stdout)["layers"][0]["rank"] == 2
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["kind"] == "not_found"


def test_closed_standard_streams(tmp_path: Path) -> None:
    # started with 2>&- or >&-: Python has None there
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(16, 16)}, p)
    no_stderr = subprocess.run([*LS, "factorize", str(p), "--rank", "2", "-o", str(tmp_path / "f.safetensors"), "--json"],
                               stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert no_stderr.returncode == 0 and json.loads(no_stderr.stdout)["layers"][0]["rank"] == 2
    no_stdout = subprocess.run([*LS, "inspect", str(p), "--json"], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: os.close(1))
    assert no_stdout.returncode == 1 and no_stdout.stderr == "error: <stdout>: write failed: stdout is closed\n"


@pytest.mark.parametrize("json_out", [True, False])
def test_a_full_stdout_is_one_error_line(tmp_path: Path, json_out: bool) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(16, 16)}, p)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*LS, "inspect", str(p), *(["--json"] if json_out else [])], stdout=full,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1 and proc.stderr == "error: <stdout>: write failed: No space left on device\n"


def test_a_large_json_to_a_reader_that_leaves_is_141(tmp_path: Path) -> None:
    # more than a pipe's 64 KiB: a buffered write of it could stop short without an error
    p = tmp_path / "many.safetensors"
    save_file({f"t{i}.weight": torch.zeros(1) for i in range(3000)}, p)
    proc = subprocess.Popen([*LS, "inspect", str(p), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


def test_json_has_no_nan(tmp_path: Path) -> None:
    """Python writes NaN as a bare token, which strict JSON parsers reject: not-measured figures are null."""
    from lorasurgeon._finite import json_safe

    assert json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": "x"}}) == {
        "a": None, "b": [1.0, None], "c": {"d": None, "e": "x"}}
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(8, 8)}, p)
    res = runner.invoke(app, ["factorize", str(p), "--rank", "2", "--dry-run", "--json"])
    assert res.exit_code == 0 and "NaN" not in res.stdout
    layer = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))["layers"][0]
    assert layer["rel_error"] is None and layer["rank"] == 2


def test_a_missing_input_is_reported_before_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out.safetensors").write_bytes(b"x")
    for argv in (["factorize", str(tmp_path / "nope.safetensors"), "--rank", "2"],
                 ["merge", str(tmp_path / "nope.safetensors"), str(tmp_path / "ad")],
                 ["convert", str(tmp_path / "ad"), "--to", "kohya"]):
        res = runner.invoke(app, [*argv, "-o", str(tmp_path / "out.safetensors")])
        assert res.exit_code == 1 and res.stderr.strip().endswith(": no such file or folder"), res.stderr
        assert "output exists" not in res.stderr


def test_package_names_load_on_first_use() -> None:
    """`import lorasurgeon` loads no torch (PEP 562); every name in __all__ resolves on use."""
    code = ("import sys, lorasurgeon as L; assert 'torch' not in sys.modules, 'torch at import'; "
            "assert set(L.__all__) == set(L._EXPORTS) | {'__version__'}; "
            "[getattr(L, n) for n in L.__all__]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unreadable_inputs_are_not_parser_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """click refuses an existing path it cannot read with exit 2 and a usage block; the contract is our
    one-line error (exit 1, JSON with --json). Root can read everything, so the refusal is simulated."""
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(8, 8)}, p)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if mode & os.R_OK else real_access(path, mode, *a, **k))
    for args in (["inspect", str(p)], ["factorize", str(p), "--rank", "2", "-o", str(tmp_path / "f.safetensors")],
                 ["merge", str(p), str(p), "-o", str(tmp_path / "m2.safetensors")], ["convert", str(p), "--to", "peft", "-o", str(tmp_path / "c")],
                 ["resize", str(p), "--rank", "1", "-o", str(tmp_path / "r")], ["compose", str(p), "--method", "cat", "-o", str(tmp_path / "k")],
                 ["extract", "--base", str(p), "--tuned", str(p), "--rank", "1", "-o", str(tmp_path / "e")]):
        res = runner.invoke(app, args)
        assert res.exit_code != 2 and "not readable" not in res.output, (args, res.output)


@pytest.mark.parametrize("name", ["out.pt", "out.bin", "out.ckpt", "out.PTH"])
def test_outputs_named_like_pickles_are_refused(tmp_path: Path, name: str) -> None:
    """We write safetensors; a .pt/.bin name would make every later reader (ours included) unpickle it."""
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(8, 8)}, p)
    res = runner.invoke(app, ["factorize", str(p), "--rank", "2", "-o", str(tmp_path / name)])
    assert res.exit_code == 1 and not (tmp_path / name).exists()
    assert res.stderr.strip().endswith(f"lorasurgeon never writes PyTorch pickles, and later steps read {Path(name).suffix} "
                                       "files as pickles: name the output .safetensors (.onnx for export), or a folder")


@pytest.mark.parametrize("existing", [False, True])
def test_a_folder_given_for_a_one_file_output_is_refused_before_the_work(tmp_path: Path, existing: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """pathlib drops the slash of ``-o out/``: without the check a file named ``out`` came out
    (and an existing folder failed only at the final rename, after the work)."""
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(8, 8)}, p)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    import lorasurgeon.factorize as fz

    monkeypatch.setattr(fz, "factorize_weight", lambda *a, **k: pytest.fail("work started before the output check"))
    given = str(out) + ("" if existing else "/")
    for extra in ([], ["--force"]):
        res = runner.invoke(app, ["factorize", str(p), "--rank", "2", "-o", given, *extra])
        assert res.exit_code == 1, res.output
        assert res.stderr == f"error: {given}: a folder, but this command writes one file here: give the file's name\n"
        assert out.is_dir() == existing and sorted(tmp_path.iterdir()) == sorted([p] + ([out] if existing else []))
    # a folder output (a PEFT adapter) may be given with its slash
    a = tmp_path / "a.safetensors"
    save_file({"base_model.model.l.lora_A.weight": torch.randn(2, 8), "base_model.model.l.lora_B.weight": torch.randn(8, 2)}, a)
    res = runner.invoke(app, ["convert", str(a), "--to", "peft", "-o", str(tmp_path / "peft") + "/"])
    assert res.exit_code == 0 and (tmp_path / "peft" / "adapter_model.safetensors").is_file(), res.output


def test_unwritable_output_folder_is_refused_before_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": torch.randn(8, 8)}, p)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    ro = str(tmp_path / "ro")
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(path) == ro and mode & os.W_OK
                        else real_access(path, mode, *a, **k))
    import lorasurgeon.factorize as fz

    monkeypatch.setattr(fz, "factorize_weight", lambda *a, **k: pytest.fail("work started before the output check"))
    res = runner.invoke(app, ["factorize", str(p), "--rank", "2", "-o", str(tmp_path / "ro" / "f.safetensors")])
    assert res.exit_code == 1 and res.stderr.strip() == f"error: {ro}: output folder is not writable"


def test_a_newline_in_a_file_name_keeps_the_error_on_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["inspect", str(tmp_path / "no\nsuch.safetensors")])
    assert res.exit_code == 1
    assert res.stderr == f"error: {tmp_path}/no\\nsuch.safetensors: no such file or folder\n"


def test_an_adapter_in_a_models_place_is_refused_with_what_to_run(tmp_path: Path) -> None:
    """factorize factored an adapter's A and B and wrote a broken folder; merge, extract and export
    gave errors about shapes or --arch."""
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({"base_model.model.q.lora_A.weight": torch.randn(2, 8), "base_model.model.q.lora_B.weight": torch.randn(8, 2)},
              ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}))
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_q.lora_down.weight": torch.randn(2, 8), "lora_unet_q.lora_up.weight": torch.randn(8, 2)}, kohya)
    for args, tail in (
        (["factorize", str(ad), "--rank", "1", "-o", str(tmp_path / "f.safetensors")],
         "this is a LoRA adapter (peft), not a model: factorize rewrites a model's weights; re-rank an adapter with "
         "lorasurgeon resize"),
        (["factorize", str(kohya), "--rank", "1", "-o", str(tmp_path / "f.safetensors")],
         "this is a LoRA adapter (kohya), not a model: factorize rewrites a model's weights; re-rank an adapter with "
         "lorasurgeon resize"),
        (["merge", str(ad), str(kohya), "-o", str(tmp_path / "m.safetensors")],
         "this is a LoRA adapter (peft), not a base model: give the model the adapters are for first, then the adapters; "
         "to combine adapters use lorasurgeon compose"),
        (["extract", "--base", str(kohya), "--tuned", str(kohya), "--rank", "1", "-o", str(tmp_path / "e")],
         "this is a LoRA adapter (kohya), not a model: extract compares two models' weights; merge the adapter into its "
         "base first"),
        (["export", str(ad), "-o", str(tmp_path / "x.onnx")],
         "this is a LoRA adapter (peft), not a model: give the model it was trained on (export takes the adapter with "
         "--adapter; merge folds it into the model)"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and res.stderr.strip().endswith(tail), (args, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "k.safetensors"]


def test_an_output_inside_an_input_folder_is_refused_even_with_force(tmp_path: Path) -> None:
    """export -o model/model.safetensors --force wrote ONNX bytes over the model's weights."""
    m = tmp_path / "model"
    m.mkdir()
    save_file({"l.weight": torch.randn(8, 8)}, m / "model.safetensors")
    before = (m / "model.safetensors").read_bytes()
    res = runner.invoke(app, ["factorize", str(m), "--rank", "2", "-o", str(m / "f.safetensors"), "--force"])
    assert res.exit_code == 1 and res.stderr == (f"error: {m / 'f.safetensors'}: the output lies inside the input folder "
                                                 "'model'; writing there would change that input: choose another output\n")
    res = runner.invoke(app, ["export", str(m), "-o", str(m / "model.safetensors"), "--force"])
    assert res.exit_code == 1 and res.stderr.endswith("name the ONNX output .onnx, got 'model.safetensors' (a later step "
                                                      "would read another extension as something else)\n")
    assert (m / "model.safetensors").read_bytes() == before and sorted(p.name for p in m.iterdir()) == ["model.safetensors"]
