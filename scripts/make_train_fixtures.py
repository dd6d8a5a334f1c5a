"""Reference for one LoRA training step: diffusers' ZImageTransformer2DModel + peft.

Run from the repository root after scripts/make_fixtures.py:

    /work/venv/bin/python scripts/make_train_fixtures.py

Writes fixtures/tiny/train_reference.safetensors with:
  lora.<module>.down / .up   the LoRA weights (peft lora_A / lora_B), f32, rank 4, alpha 4,
                             on q/k/v/out and w1/w2/w3 of the main `layers` (zlora's default)
  x0 (2,16,12,20), eps (2,16,12,20), sigmas (2,), caps.0 (13,32), caps.1 (40,32)
  loss ()                    mean over items of the per-item MSE between the raw transformer
                             output at t = 1 - sigma and x0 - eps
  grad.<module>.down / .up   d loss / d lora_A, d loss / d lora_B
Noise and timesteps are injected (torch's RNG cannot be reproduced in Rust).
"""
import re
import sys
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny"
RANK, ALPHA = 4, 4
PATTERN = r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"


def main():
    torch.manual_seed(1234)
    model = ZImageTransformer2DModel.from_pretrained(TINY / "model" / "transformer", torch_dtype=torch.float32)
    model.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PATTERN, init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    params = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name
            assert re.fullmatch(PATTERN, path), path
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
            a.requires_grad_(True)
            b.requires_grad_(True)
            params[path] = (a, b)
            tensors[f"lora.{path}.down"] = a.detach().clone()
            tensors[f"lora.{path}.up"] = b.detach().clone()
    assert len(params) == 14, len(params)

    x0 = torch.randn((2, 16, 12, 20), generator=gen)
    eps = torch.randn((2, 16, 12, 20), generator=gen)
    sigmas = torch.tensor([0.3, 0.8])
    caps = [torch.randn((13, 32), generator=gen), torch.randn((40, 32), generator=gen)]
    s = sigmas.view(2, 1, 1, 1)
    x = (1 - s) * x0 + s * eps
    t = 1 - sigmas
    out = model(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    out = torch.stack(out).squeeze(2)
    target = x0 - eps
    loss = ((out - target) ** 2).flatten(1).mean(1).mean()
    loss.backward()

    tensors.update({"x0": x0, "eps": eps, "sigmas": sigmas, "caps.0": caps[0], "caps.1": caps[1], "loss": loss.detach()})
    for path, (a, b) in params.items():
        tensors[f"grad.{path}.down"] = a.grad.detach().clone()
        tensors[f"grad.{path}.up"] = b.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, TINY / "train_reference.safetensors",
              metadata={"rank": str(RANK), "alpha": str(ALPHA), "loss": f"{loss.item():.9g}"})
    print(f"loss {loss.item():.6f}; wrote {len(tensors)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
