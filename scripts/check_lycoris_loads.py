#!/usr/bin/env python
"""Does LyCORIS itself load what zlora writes for LoKr and LoHa?

    cargo build --release && /work/venv/bin/python scripts/check_lycoris_loads.py target/release/zlora

For the LyCORIS fixtures (fixtures/tiny/lora_{lokr,loha}.safetensors, written by LyCORIS'
`save_weights` with `lycoris_` names), zlora converts each to musubi's layout
(`lora_unet_<module>`, the names LyCORIS' kohya wrapper uses); LyCORIS' kohya wrapper
(`lycoris.kohya.create_network_from_weights`) loads the converted file onto the tiny
transformer and its output is compared with the original file loaded by LyCORIS' own wrapper
(`create_lycoris_from_weights`). Prints the module counts and the largest output difference.
"""

import subprocess
import sys
import tempfile
import warnings

import torch
from diffusers import ZImageTransformer2DModel
from lycoris import create_lycoris_from_weights
from lycoris.kohya import create_network_from_weights

warnings.filterwarnings("ignore")


def model():
    return ZImageTransformer2DModel.from_pretrained(
        "fixtures/tiny/model", subfolder="transformer", torch_dtype=torch.float32).eval()


def main(zlora: str) -> None:
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    for algo in ["lokr", "loha"]:
        original = f"fixtures/tiny/lora_{algo}.safetensors"
        converted = f"{tmp}/{algo}_musubi.safetensors"
        subprocess.run([zlora, "lora", "convert", original, converted, "--to", "musubi"], check=True)
        a, b = model(), model()
        net, _ = create_lycoris_from_weights(1.0, original, a)
        net.apply_to()
        kohya, _ = create_network_from_weights(1.0, converted, None, None, b, for_inference=True)
        kohya.apply_to(None, b, apply_text_encoder=False, apply_unet=True)
        x = [torch.randn(16, 1, 8, 8)]
        t = torch.tensor([0.5])
        cap = [torch.randn(7, a.config.cap_feat_dim)]
        with torch.no_grad():
            oa = a(x, t, cap, return_dict=False)[0][0]
            ob = b(x, t, cap, return_dict=False)[0][0]
            plain = model()(x, t, cap, return_dict=False)[0][0]
        print(f"{algo}: modules {len(net.loras)} (LyCORIS, original) / {len(kohya.unet_loras)} "
              f"(LyCORIS kohya wrapper, zlora's file); max |difference| {float((oa - ob).abs().max()):.3g}; "
              f"adapter effect {float((oa - plain).abs().max()):.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
