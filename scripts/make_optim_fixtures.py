#!/usr/bin/env python
"""Reference trajectories of Prodigy and Adafactor for zlora's optimizer tests.

Run from the repository root with torch, prodigyopt and transformers installed:

    python -m venv /work/venv && /work/venv/bin/pip install torch prodigyopt transformers safetensors bitsandbytes
    /work/venv/bin/python scripts/make_optim_fixtures.py

Each case draws (seed 0) LoRA-like parameters — down factors (rank, in) at random, up factors
(out, rank) at zero as LoRA starts them, and one 1-D tensor (Adafactor keeps a full second
moment for it) — and 20 gradient sets: a fixed direction plus noise, so the optimizer makes
progress and Prodigy's step size grows. The learning rate warms up linearly over the first
5 steps (the trainer's schedule hands the optimizer a new rate every step). The reference
optimizer takes the 20 steps; fixtures/optim/CASE.safetensors holds, in f32:

    NAME.init          the parameters before step 1
    NAME.grad.TT       the gradient of step TT (01..20)
    NAME.step.TT       the parameters after step TT
    lr                 the 20 learning rates (f64)

and the optimizer's settings as JSON in the metadata ("config"). The Rust test
(crates/zlora/tests/optim_reference.rs) feeds the same gradients and rates to zlora's
optimizer with the same settings and compares every step.

With bitsandbytes installed (its CPU build suffices), fixtures/optim/bnb_blockwise.safetensors
holds what 8-bit AdamW's moments are made of: the signed and unsigned dynamic maps
(`create_dynamic_map`) and, for a signed tensor (a first moment) and an unsigned one (a
second moment) of 1000 elements whose scale changes from block to block, bitsandbytes'
`quantize_blockwise` codes and absmax with blocks of 256.
"""

import json
import os

import torch
from prodigyopt import Prodigy
from safetensors.torch import save_file
from transformers.optimization import Adafactor

STEPS = 20
SHAPES = {
    "a.lora_down": (4, 48),
    "a.lora_up": (40, 4),
    "b.lora_down": (8, 32),
    "b.lora_up": (24, 8),
    "c.scale": (24,),
}

# (case, optimizer, base lr, settings). Prodigy: its defaults, then what peers set
# (kohya/ai-toolkit recipes: d_coef, decoupled weight decay, bias correction, safeguard
# warmup). Adafactor as the peers configure it for LoRA (a given lr, relative_step,
# scale_parameter and warmup_init off), without and with a first moment and weight decay.
CASES = [
    ("prodigy_defaults", "prodigy", 1.0, {}),
    (
        "prodigy_peer",
        "prodigy",
        1.0,
        dict(d_coef=2.0, weight_decay=0.01, use_bias_correction=True, safeguard_warmup=True),
    ),
    ("adafactor_defaults", "adafactor", 1e-3, {}),
    ("adafactor_beta1", "adafactor", 1e-3, dict(beta1=0.9, weight_decay=0.01)),
]


def make_optimizer(kind, params, lr, settings):
    if kind == "prodigy":
        return Prodigy(params, lr=lr, **settings)
    return Adafactor(
        params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False, **settings
    )


def run_case(name, kind, base_lr, settings):
    gen = torch.Generator().manual_seed(0)
    params, out = {}, {}
    for key, shape in SHAPES.items():
        init = torch.zeros(shape) if key.endswith("lora_up") else torch.randn(shape, generator=gen) * 0.1
        params[key] = torch.nn.Parameter(init.clone())
        out[f"{key}.init"] = init.clone()
    direction = {k: torch.randn(p.shape, generator=gen) * 1e-2 for k, p in params.items()}
    opt = make_optimizer(kind, list(params.values()), base_lr, settings)
    lrs = []
    for t in range(1, STEPS + 1):
        lr = base_lr * min(1.0, t / 5)
        for group in opt.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        for key, p in params.items():
            g = direction[key] + torch.randn(p.shape, generator=gen) * 5e-3
            out[f"{key}.grad.{t:02}"] = g.clone()
            p.grad = g
        opt.step()
        for key, p in params.items():
            out[f"{key}.step.{t:02}"] = p.detach().clone()
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    config = dict(optimizer=kind, lr=base_lr, **settings)
    path = os.path.join("fixtures", "optim", f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"config": json.dumps(config)})
    print(path, config)


def blockwise_case():
    import bitsandbytes
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(1)
    scales = torch.tensor([1e-2, 1e-5, 3.0, 1e-3]).repeat_interleave(256)[:1000]
    x = torch.randn(1000, generator=gen) * scales
    out = {}
    for kind, values, signed in [("signed", x, True), ("unsigned", x * x, False)]:
        code = F.create_dynamic_map(signed=signed)
        codes, state = F.quantize_blockwise(values, code=code, blocksize=256)
        out[f"{kind}.map"] = code
        out[f"{kind}.x"] = values
        out[f"{kind}.codes"] = codes
        out[f"{kind}.absmax"] = state.absmax.float()
    path = os.path.join("fixtures", "optim", "bnb_blockwise.safetensors")
    meta = {"bitsandbytes": bitsandbytes.__version__, "blocksize": "256"}
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print(path, meta)


def main():
    torch.manual_seed(0)
    os.makedirs(os.path.join("fixtures", "optim"), exist_ok=True)
    for case in CASES:
        run_case(*case)
    blockwise_case()


if __name__ == "__main__":
    main()
