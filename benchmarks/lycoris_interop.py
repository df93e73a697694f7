"""lorasurgeon against LyCORIS itself (lycoris-lora): files LyCORIS saves, merged by LyCORIS's own
loader (``kohya.create_network_from_weights`` + ``merge_to``) and by ``merge_adapters``.

LoRA/LoCon files (with alpha or none, ``use_scalar``, ``rs_lora``, DoRA, bypass mode, fp16) must
merge to LyCORIS's result; every other algorithm must be refused by name, nothing written.

Needs lycoris-lora, which the project's venv does not install (einops and toml are its only other
needs here), e.g.:

    pip install --target /tmp/lyco --no-deps lycoris-lora einops toml
    PYTHONPATH=/tmp/lyco:. .venv/bin/python benchmarks/lycoris_interop.py

Prints one line per case and exits 1 if any case misses.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorasurgeon.errors import UnsupportedError
from lorasurgeon.merge import merge_adapters

try:
    from lycoris import kohya
except ImportError:
    sys.exit("needs lycoris-lora on PYTHONPATH (see the docstring)")


# Class names as diffusers has them: LyCORIS's kohya presets pick modules by class name.
class ResnetBlock2D(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c, c, 1)
        self.time_emb_proj = nn.Linear(32, c)


class Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_v = nn.Linear(c, c, bias=False)


class Transformer2DModel(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(c, c)
        self.attn1 = Attn(c)
        self.ff = nn.Linear(c, 4 * c)


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(16)])
        self.attentions = nn.ModuleList([Transformer2DModel(16)])


MERGED = {  # name -> create_network kwargs (dim 4, alpha 2 unless stated)
    "locon": dict(algo="locon", conv_dim=4, conv_alpha=1),
    "lora (Linear only)": dict(algo="lora"),
    "locon, alpha 0 (saved as r)": dict(algo="locon", conv_dim=4, conv_alpha=0, _alpha=0),
    "locon, use_scalar": dict(algo="locon", conv_dim=4, conv_alpha=1, use_scalar=True),
    "locon, rs_lora": dict(algo="locon", conv_dim=4, conv_alpha=1, rs_lora=True),
    "locon, DoRA (wd_on_output)": dict(algo="locon", conv_dim=4, conv_alpha=1, dora_wd=True),
    "locon, bypass_mode": dict(algo="locon", conv_dim=4, conv_alpha=1, bypass_mode=True),
    "locon, saved fp16": dict(algo="locon", conv_dim=4, conv_alpha=1, _dtype=torch.float16),
}
REFUSED = {  # name -> (create_network kwargs, what the refusal must name)
    "loha": (dict(algo="loha", conv_dim=4, conv_alpha=1), "LoHa (LyCORIS)"),
    "lokr": (dict(algo="lokr", conv_dim=4, conv_alpha=1, factor=4), "LoKr (LyCORIS)"),
    "locon, use_tucker": (dict(algo="locon", conv_dim=4, conv_alpha=1, use_tucker=True), "use_tucker"),
    "locon, DoRA on the input side": (dict(algo="locon", conv_dim=4, conv_alpha=1, dora_wd=True, wd_on_output=False),
                                      "wd_on_out=False"),
    "ia3": (dict(algo="ia3"), "(IA)³ (LyCORIS)"),
    "glora": (dict(algo="glora", conv_dim=4, conv_alpha=1), "GLoRA (LyCORIS)"),
    "full": (dict(algo="full"), "LyCORIS full (diff)"),
    "diag-oft": (dict(algo="diag-oft", conv_dim=4, conv_alpha=1), "OFT"),
}


def save_lycoris(model: nn.Module, kw: dict, path: Path) -> object:
    """Create LyCORIS's network on ``model``, give every weight seeded random values (LoRA's up
    factor starts at zero), save it as LyCORIS saves it."""
    kw = dict(kw)
    alpha, dtype = kw.pop("_alpha", 2), kw.pop("_dtype", None)
    net = kohya.create_network(1.0, 4, alpha, None, None, model, **kw)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for lora in net.unet_loras:
            for name, p in lora.named_parameters():
                last = name.rsplit(".", 1)[-1]
                if last == "dora_scale":
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
                elif last == "scalar":
                    p.fill_(0.5)
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    net.save_weights(str(path), dtype, {"ss_network_module": "lycoris.kohya"})
    return net


def main() -> int:
    torch.manual_seed(0)
    base_state = {k: v.contiguous() for k, v in TinyUNet().state_dict().items()}
    missed = 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        save_file(base_state, tmp / "base.safetensors")
        for name, kw in MERGED.items():
            model = TinyUNet()
            model.load_state_dict(base_state)
            save_lycoris(model, kw, tmp / "a.safetensors")
            ref_model = TinyUNet()
            ref_model.load_state_dict(base_state)
            net, weights = kohya.create_network_from_weights(1.0, str(tmp / "a.safetensors"), None, None, ref_model)
            with torch.no_grad():
                net.merge_to(None, ref_model, weights, None, "cpu")
            ref = ref_model.state_dict()
            merge_adapters(tmp / "base.safetensors", [tmp / "a.safetensors"], tmp / "m.safetensors", force=True)
            got = load_file(tmp / "m.safetensors")
            diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
            change = max(float((ref[k] - base_state[k]).abs().max()) for k in ref)
            ok = diff <= 1e-6 * max(change, 1.0) and change > 0
            missed += not ok
            print(f"{'ok    ' if ok else 'MISSED'} merged  {name:32} max |ours - LyCORIS| {diff:.2e} (largest change {change:.3f})")
        for name, (kw, says) in REFUSED.items():
            model = TinyUNet()
            model.load_state_dict(base_state)
            save_lycoris(model, kw, tmp / "r.safetensors")
            out = tmp / "r_out.safetensors"
            try:
                merge_adapters(tmp / "base.safetensors", [tmp / "r.safetensors"], out)
                ok, msg = False, "merged"
            except UnsupportedError as e:
                ok, msg = says in e.message and not out.exists(), e.message
            missed += not ok
            print(f"{'ok    ' if ok else 'MISSED'} refused {name:32} {msg[:110]}")
    print("all cases as promised" if not missed else f"{missed} case(s) missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
