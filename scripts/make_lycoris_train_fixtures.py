#!/usr/bin/env python
"""LyCORIS' own LoKr and LoHa modules on one Linear, for zlora's training parity test.

Run from the repository root (CPU, a few seconds):

    /work/venv/bin/python scripts/make_lycoris_train_fixtures.py

For each case a torch Linear(96 → 64) with bias gets the LyCORIS module (lycoris-lora's
`LokrModule` / `LohaModule`, multiplier 1), built with the case's options. First the module
as LyCORIS initialises it (seed 0): `fixtures/lycoris_train/CASE.safetensors` records which
factors LyCORIS starts at zero (metadata `zero_init`, so the adapter's first delta is 0).
Then every factor is set to 0.3·randn (seeded), so no gradient vanishes, and for a fixed
input x [2, 5, 96] and upstream gradient dy [2, 5, 64] the file holds, in f32:

    weight, bias           the frozen Linear
    x, dy                  input and upstream gradient
    out                    the adapted Linear's output (LyCORIS' forward)
    dx                     the input's gradient, x.grad of sum(out · dy)
    F, F.grad              each factor under its LyCORIS name (lokr_w1, lokr_w2_a, hada_w1_a, ...)
                           and its gradient

and the case's settings (rank, alpha, factor, decompose_both, full_matrix, LyCORIS' scale)
as JSON in the metadata ("config"). crates/zlora/tests/lycoris_training.rs builds the same
adapter with zlora's trainable factors and compares the forward and every gradient.
"""

import importlib.metadata
import json
import os

import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import save_file

OUT = os.path.join("fixtures", "lycoris_train")
IN, OUTF = 96, 64
CASES = [
    # name, module class, options
    ("lokr", LokrModule, dict(lora_dim=2, alpha=1.0, factor=-1)),
    ("lokr_decompose_both", LokrModule, dict(lora_dim=2, alpha=1.0, factor=-1, decompose_both=True)),
    ("lokr_factor4", LokrModule, dict(lora_dim=2, alpha=3.0, factor=4)),
    ("lokr_full_matrix", LokrModule, dict(lora_dim=2, alpha=1.0, factor=-1, full_matrix=True)),
    ("loha", LohaModule, dict(lora_dim=2, alpha=1.0)),
]


def build(cls, opts):
    torch.manual_seed(0)
    linear = torch.nn.Linear(IN, OUTF)
    module = cls("lycoris_x", linear, multiplier=1.0, **opts)
    module.apply_to()
    return linear, module


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for i, (name, cls, opts) in enumerate(CASES):
        linear, module = build(cls, opts)
        params = dict(sorted(module.named_parameters()))
        zero = sorted(n for n, p in params.items() if not p.detach().abs().gt(0).any())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in params.values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        x = torch.randn(2, 5, IN, generator=g).requires_grad_(True)
        dy = torch.randn(2, 5, OUTF, generator=g)
        out = linear(x)
        (out * dy).sum().backward()
        t = dict(weight=linear.weight, bias=linear.bias, x=x, dy=dy, out=out, dx=x.grad)
        for n, p in params.items():
            t[n] = p
            t[n + ".grad"] = p.grad
        t = {k: v.detach().float().contiguous() for k, v in t.items()}
        config = dict(opts, scale=float(module.scale), zero_init=zero,
                      lycoris=importlib.metadata.version("lycoris-lora"), torch=torch.__version__)
        save_file(t, os.path.join(OUT, f"{name}.safetensors"),
                  metadata={"config": json.dumps(config, sort_keys=True)})
        print(name, {n: tuple(p.shape) for n, p in params.items()}, "zero:", zero, "scale", module.scale)


if __name__ == "__main__":
    main()
