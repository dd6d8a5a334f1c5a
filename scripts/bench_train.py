#!/usr/bin/env python
"""Training benchmark: one LoRA step of `zlora train` against diffusers + peft on the CPU.

A benchmark, not a test (CI does not run it). Run from the repository root after
`cargo build --release`:

    /work/venv/bin/python scripts/bench_train.py [--zlora target/release/zlora]
        [--workdir DIR] [--reps 2] [--steps 8] [--warmup 2] [--threads 2]
        [--batch 2] [--rank 16]

The model is the random-weight Z-Image model of scripts/bench_generate.py (transformer dim
256, 4 main + 2 + 2 refiner layers, 4 heads of 64, FFN 682, caption features 128, built by
its `build_model`). The dataset is `zlora tiny-dataset` at 256x256 with every caption set to
bench_generate's prompt, so all items have the same caption length and latent shape; zlora
caches latents and caption features once (a 1-step run) before anything is timed, and the
reference builds a batch of exactly the cached shapes: latents (B, 16, 32, 32) and caption
features (L, 128) per item, L read from zlora's cache.

One step = forward + flow-matching MSE + backward + grad-norm clipping (1.0) + AdamW, batch
--batch, LoRA rank = alpha = --rank on to_q/to_k/to_v/to_out.0/w1/w2/w3 of the main `layers`
(zlora's default targets; peft gets the same regex as scripts/make_train_fixtures.py).

    zlora      `zlora train` with base_dtype f32, sampling off, checkpoints only at the end;
               step times are the `step_seconds` of OUTPUT/log.jsonl
    reference  a worker process: ZImageTransformer2DModel.from_pretrained (float32, CPU),
               peft inject_adapter_in_model, torch.optim.AdamW; each step timed with
               perf_counter

each with gradient checkpointing on and off (`[train] gradient_checkpointing`;
`model.enable_gradient_checkpointing()`), every run a fresh process with the same thread
count (candle: RAYON_NUM_THREADS; torch: set_num_threads and OMP/MKL_NUM_THREADS), the four
configurations interleaved over --reps repetitions. Step time: median over the steps after
--warmup of all repetitions. Peak memory: the process's peak RSS (VmHWM from
/proc/self/status, for both sides: zlora's log.jsonl `peak_memory_mib`); the reference also
reports its VmHWM after the imports and after the model load. A "tiny run" of zlora (64x64, batch 1, 1 step) shows the near-constant part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPT, QUIET, ROOT, SIZE, build_model, in_workdir, run_env  # noqa: E402

PATTERN = r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"
LR = 1e-4


# --------------------------------------------------------------------------------------
# reference worker (a fresh process per run)
# --------------------------------------------------------------------------------------
def maxrss_mib() -> float:
    """VmHWM (peak RSS of this process image): ru_maxrss would also count the parent's peak
    from before exec, which Linux carries over into the child's rusage."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reference_worker(a: argparse.Namespace) -> None:
    import torch
    from diffusers import ZImageTransformer2DModel
    from diffusers.utils import logging as dlog
    from peft import LoraConfig, inject_adapter_in_model

    torch.set_num_threads(a.threads)
    dlog.set_verbosity_error()
    rss_import = maxrss_mib()
    model = ZImageTransformer2DModel.from_pretrained(a.model, torch_dtype=torch.float32).to("cpu")
    model.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=PATTERN), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    lora_params = sum(p.numel() for p in params)
    if a.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rss_model = maxrss_mib()

    b, c, h, w = a.batch, 16, a.latent, a.latent
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((b, c, h, w), generator=gen)
    caps = [torch.randn((a.cap_len, a.cap_dim), generator=gen) for _ in range(b)]
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        eps = torch.randn(x0.shape, generator=gen)
        sigmas = torch.sigmoid(torch.randn((b,), generator=gen))
        s = sigmas.view(b, 1, 1, 1)
        x = (1 - s) * x0 + s * eps
        out = model(list(x.unsqueeze(2).unbind(0)), 1 - sigmas, caps, return_dict=False)[0]
        out = torch.stack(out).squeeze(2)
        loss = ((out - (x0 - eps)) ** 2).flatten(1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"steps": times, "rss_import": rss_import, "rss_model": rss_model,
                      "rss": maxrss_mib(), "lora_params": lora_params, "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------
def run_child(cmd: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def zlora_config(work: Path, name: str, resolution: int, batch: int, rank: int, ckpt: bool, steps: int) -> Path:
    cfg = work / f"{name}.toml"
    cfg.write_text(f"""
[model]
path = "{work / 'model'}"
variant = "turbo"
base_dtype = "f32"

[dataset]
path = "{work / 'dataset'}"
resolution = {resolution}
caption_dropout = 0.0

[lora]
rank = {rank}
alpha = {rank}

[train]
steps = {steps}
learning_rate = {LR}
batch_size = {batch}
seed = 1
save_every = 1000000
output = "{work / 'runs' / name}"
gradient_checkpointing = {str(ckpt).lower()}
""")
    return cfg


def run_zlora(a, work: Path, ckpt: bool, resolution: int = SIZE, batch: int | None = None, steps: int | None = None,
              name: str | None = None) -> dict:
    name = name or f"zlora_{'ckpt' if ckpt else 'full'}"
    cfg = zlora_config(work, name, resolution, batch or a.batch, a.rank, ckpt, steps or a.steps)
    run_child([a.zlora, "train", str(cfg), "--force"], run_env(a.threads))
    log = [json.loads(line) for line in (work / "runs" / name / "log.jsonl").read_text().splitlines()]
    return {"steps": [e["step_seconds"] for e in log], "rss": log[-1]["peak_memory_mib"]}


def run_reference(a, work: Path, ckpt: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(work / "model" / "transformer"),
           "--threads", str(a.threads), "--steps", str(a.steps), "--batch", str(a.batch), "--rank", str(a.rank),
           "--latent", str(a.latent), "--cap-len", str(a.cap_len), "--cap-dim", str(a.cap_dim)]
    if ckpt:
        cmd.append("--checkpointing")
    d = json.loads(run_child(cmd, run_env(a.threads)).strip().splitlines()[-1])
    assert d["threads"] == a.threads, d
    return d


def cached_shapes(cache: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(latent shape, caption shape) of the entries in zlora's cache: all items are alike."""
    from safetensors import safe_open

    latents, captions = set(), set()
    for f in cache.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = tuple(st.get_slice(k).get_shape())
                (latents if len(shape) == 3 else captions).add(shape)
    return latents, captions


def bench(a: argparse.Namespace, work: Path) -> None:
    sizes = build_model(work / "model", work / "latents.safetensors")
    ds = work / "dataset"
    subprocess.run([a.zlora, "tiny-dataset", "--out", str(ds), "--count", "8", "--size", str(SIZE), "--force"],
                   check=True, env=run_env(a.threads), capture_output=True)
    for txt in ds.glob("*.txt"):
        txt.write_text(PROMPT)
    # fill the cache (256 for the benchmark, 64 for the tiny run); not timed
    run_zlora(a, work, True, steps=1, name="cache")
    run_zlora(a, work, True, resolution=64, batch=1, steps=1, name="cache64")
    latents, caps = cached_shapes(work / "dataset" / ".zlora-cache")
    print(f"cached latent shapes {sorted(latents)}, caption shapes {sorted(caps)}")
    lat = max(latents)
    a.latent = lat[1]
    a.cap_len, a.cap_dim = max(caps)  # the prompt (the other caption is the empty one)
    print(f"model in {work / 'model'}; parameters: {sizes}")
    print(f"threads: {a.threads}; batch {a.batch}; rank {a.rank}; latents ({a.batch}, 16, {a.latent}, {a.latent}); "
          f"caption features ({a.cap_len}, {a.cap_dim}); {a.steps} steps per run, {a.warmup} warm-up; reps {a.reps}")
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    runners = {
        "zlora, checkpointing": lambda: run_zlora(a, work, True),
        "zlora, no checkpointing": lambda: run_zlora(a, work, False),
        "reference, checkpointing": lambda: run_reference(a, work, True),
        "reference, no checkpointing": lambda: run_reference(a, work, False),
    }
    runs: dict[str, list[dict]] = {n: [] for n in runners}
    for rep in range(a.reps):
        for name, run in runners.items():
            runs[name].append(run())
            r = runs[name][-1]
            print(f"rep {rep + 1} {name}: steps {' '.join(f'{s:.3f}' for s in r['steps'])}; peak {r['rss']:.0f} MiB"
                  + (f" (import {r['rss_import']:.0f}, model {r['rss_model']:.0f})" if "rss_import" in r else ""),
                  flush=True)
    tiny = run_zlora(a, work, True, resolution=64, batch=1, steps=1, name="tiny")
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    print(f"zlora tiny run (64x64, batch 1, 1 step): peak {tiny['rss']:.1f} MiB")
    ref = runs["reference, checkpointing"][0]
    print(f"reference: RSS after imports {ref['rss_import']:.0f} MiB, after model + LoRA {ref['rss_model']:.0f} MiB; "
          f"LoRA parameters {ref['lora_params']}")

    med = {n: statistics.median(s for r in v for s in r["steps"][a.warmup:]) for n, v in runs.items()}
    spread = {n: (min(s for r in v for s in r["steps"][a.warmup:]), max(s for r in v for s in r["steps"][a.warmup:]))
              for n, v in runs.items()}
    peak = {n: max(r["rss"] for r in v) for n, v in runs.items()}
    print()
    print("| configuration | step time, median [s] | range [s] | peak RSS [MiB] | peak − RSS before the model [MiB] |")
    print("|---|---:|---:|---:|---:|")
    for n in runners:
        base = runs[n][0]["rss_import"] if "rss_import" in runs[n][0] else None
        extra = f"{peak[n] - base:.0f}" if base is not None else "—"
        print(f"| {n} | {med[n]:.3f} | {spread[n][0]:.3f}–{spread[n][1]:.3f} | {peak[n]:.0f} | {extra} |")
    print()
    print("| zlora / reference | step time | peak RSS |")
    print("|---|---:|---:|")
    for mode in ("checkpointing", "no checkpointing"):
        z, r = f"zlora, {mode}", f"reference, {mode}"
        print(f"| {mode} | {med[z] / med[r]:.2f} | {peak[z] / peak[r]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zlora", default=str(ROOT / "target/release/zlora"))
    p.add_argument("--workdir", type=Path)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    # internal: one reference run in a fresh process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    for name in ("--latent", "--cap-len", "--cap-dim"):
        p.add_argument(name, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.update(QUIET)
    if a.worker:
        reference_worker(a)
        return
    in_workdir(a, bench)


if __name__ == "__main__":
    main()
