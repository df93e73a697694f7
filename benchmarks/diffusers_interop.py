"""DoRA and lora_bias adapters converted to diffusers files by lorasurgeon, loaded by diffusers.

A seeded tiny UNet gets a PEFT adapter (DoRA; lora_bias), with the magnitudes and biases moved
away from their initial values so that they matter. ``convert_adapter(..., "diffusers",
component="unet")`` writes the diffusers file; diffusers' own loader (``lora_state_dict`` and
``load_lora_into_unet``, as ``load_lora_weights`` calls them) puts it into a fresh UNet, whose
output is compared with the PEFT model's; lorasurgeon's merge of the file into the UNet's weights
is compared too. Needs diffusers, which the project's venv does not install:

    pip install diffusers   # into a venv that has lorasurgeon's dependencies
    python benchmarks/diffusers_interop.py

Prints one line per adapter kind; exit 1 when a difference exceeds 1e-5.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    u = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    with torch.no_grad():  # no zero-initialised layers: they would hide errors
        for p in u.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return u.eval()


def main() -> int:
    import peft
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    from lorasurgeon.convert import convert_adapter
    from lorasurgeon.merge import merge_adapters

    torch.set_num_threads(1)
    base = tiny_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10])
    e = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    kinds = {  # lora_bias needs layers with a bias (peft refuses it elsewhere, and on DoRA)
        "dora": (dict(use_dora=True), ["to_q", "to_v", "conv1", "proj_in"]),
        "lora_bias": (dict(lora_bias=True), ["to_out.0", "conv1", "proj_in"]),
    }
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, d / "unet.safetensors")
        for name, (kw, targets) in kinds.items():
            torch.manual_seed(3)
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                          init_lora_weights=False, **kw))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n and n.endswith("bias"):
                        p.copy_(torch.randn_like(p) * 0.1)
                    if "lora_magnitude" in n:
                        p.mul_(1 + 0.1 * torch.randn_like(p))
                ref = pm(x, t, e).sample
            pm.save_pretrained(d / name)
            out = d / f"{name}.safetensors"
            convert_adapter(d / name, "diffusers", out, component="unet")
            unet = copy.deepcopy(base)
            sd, alphas, meta = Loader.lora_state_dict(str(out), return_lora_metadata=True)
            Loader.load_lora_into_unet(sd, alphas, unet, adapter_name="a", metadata=meta)
            with torch.no_grad():
                loaded = float((unet(x, t, e).sample - ref).abs().max())
            merge_adapters(d / "unet.safetensors", [out], d / f"m_{name}.safetensors")
            merged_unet = copy.deepcopy(base)
            merged_unet.load_state_dict(load_file(d / f"m_{name}.safetensors"))
            with torch.no_grad():
                merged = float((merged_unet(x, t, e).sample - ref).abs().max())
            worst = max(worst, loaded, merged)
            print(f"{name}: diffusers-loaded UNet vs peft max |diff| {loaded:.3g}; lorasurgeon merge vs peft {merged:.3g} "
                  f"(output scale {float(ref.abs().max()):.3g})")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
