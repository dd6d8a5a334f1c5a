#!/usr/bin/env python
"""GPU benchmark: zlora built with `--features cuda` against diffusers (+ peft) on one GPU, in
one run, on a random-weight model with the real Z-Image transformer dimensions.

A benchmark, not a test. On the CPU machine, `bash scripts/gpu-prepare.sh` builds the CUDA
binary (scripts/cuda-build.sh), packs it into `.gpu/zlora.xz` and fetches the diffusers wheel
into `.whl/` (both git-ignored, carried to the GPU machine); docs/gpu.md gives the device
command. On the GPU machine (PyTorch, transformers and peft installed; no Rust):

    python3 scripts/bench_gpu.py --zlora .gpu/zlora --out $OUT

A dry run of every stage on the CPU with small dimensions (dim 256, 256 px, f32):

    /work/venv/bin/python scripts/bench_gpu.py --small --device cpu

Stages (each timed, each failure reported and the next stage run):

1. model     a random model in the diffusers layout: the transformer with Z-Image's dimensions
             (dim 3840, 30 + 2 + 2 blocks, 30 heads, caption features 2560; 6.15 B parameters,
             bf16), the real VAE configuration, and a one-layer Qwen3 text encoder of the real
             width (text encoding is not what is measured) with the byte-level tokenizer of
             scripts/random_zimage.py.
2. generate  `zlora generate` at 1024x1024, guidance 0, with 8 and with 2 steps (a fresh
             process each); seconds per denoising step = (t8 - t2) / 6.
3. diffusers ZImagePipeline, the same model, size and steps, loaded once; the same estimate.
4. train     `zlora train`: 4 images at 1024 px, rank 16, batch 1, bf16 base, gradient
             checkpointing, --steps steps; seconds per step (median after 2) from log.jsonl,
             peak GPU memory from nvidia-smi polled every 50 ms (minus the idle reading).
5. reference diffusers ZImageTransformer2DModel (bf16) + peft LoRA (zlora's default
             targets, rank 16) + gradient checkpointing + AdamW on the latent and caption
             shapes zlora cached; seconds per step, torch.cuda.max_memory_allocated.
6. MFU       FLOPs per step from `zlora plan --json` (the counted model of docs/plan.md)
             against the GPU's dense bf16 peak (and against a measured 8192^3 bf16 matmul).

Prints a markdown table and writes bench_gpu.json (and the logs) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DIT_CFG, PROMPT, ROOT, SCHED_CFG, TE_CFG, VAE_CFG  # noqa: E402
from bench_train import LR, PATTERN, cached_shapes  # noqa: E402

REAL = dict(
    dit=dict(DIT_CFG, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
             cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    te=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=1, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
            max_position_embeddings=4096, tie_word_embeddings=True),
    vae=dict(VAE_CFG, block_out_channels=[128, 256, 512, 512], norm_num_groups=32),
    size=1024,
    dtype="bfloat16",
)
SMALL = dict(dit=DIT_CFG, te=TE_CFG, vae=VAE_CFG, size=256, dtype="float32")
# Dense bf16 peak per GPU name fragment (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}
ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_VERBOSITY="error",
           TRANSFORMERS_VERBOSITY="error")


class GpuMemory:
    """Peak of nvidia-smi's memory.used while running, above the reading before."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak = self.base = 0.0

    @staticmethod
    def read() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return float(out.split()[0])

    def __enter__(self):
        if self.enabled:
            self.base = self.peak = self.read()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()

    def used_mib(self) -> float | None:
        return self.peak - self.base if self.enabled else None


def zlora_env() -> dict[str, str]:
    """The environment for zlora: the CUDA 13 libraries a CUDA build links against come with
    PyTorch's pip packages (site-packages/nvidia/*/lib)."""
    env = {**os.environ, **ENV}
    try:
        import nvidia
    except ImportError:
        return env
    libs = sorted({str(p) for root in nvidia.__path__ for p in Path(root).glob("*/lib")})
    env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")])
    return env


def run(cmd: list[str], log: Path, timeout: float) -> float:
    """Runs a command, its output into `log`; returns the wall time."""
    t = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=True, env=zlora_env())
    return time.perf_counter() - t


def build_model(a, model: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers import ZImageTransformer2DModel
    from random_zimage import build_tokenizer, randomize_
    from transformers import Qwen3Config, Qwen3Model

    dims, dtype = a.dims, getattr(torch, a.dims["dtype"])
    tok = build_tokenizer()
    with torch.device(a.device):
        te = Qwen3Model(Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **dims["te"])).eval()
        dit = ZImageTransformer2DModel(**dims["dit"]).eval()
        vae = AutoencoderKL(**dims["vae"]).eval()
    for seed, module in enumerate([te, dit, vae], start=1):
        randomize_(module, seed=seed)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHED_CFG), vae=vae.to(dtype),
                          text_encoder=te.to(dtype), tokenizer=tok, transformer=dit.to(dtype))
    pipe.save_pretrained(model, safe_serialization=True, max_shard_size="5GB")
    params = sum(p.numel() for p in dit.parameters())
    del pipe, te, dit, vae
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {"transformer_parameters": params}


def zlora_generate(a, model: Path, work: Path) -> dict:
    times = {}
    for steps in (8, 2):
        cmd = [a.zlora, "generate", "--model", str(model), "--prompt", PROMPT, "--width", str(a.size),
               "--height", str(a.size), "--steps", str(steps), "--guidance", "0", "--seed", "1",
               "--out", str(work / f"zlora_{steps}.png"), "--force"]
        with GpuMemory(a.device == "cuda") as mem:
            times[steps] = run(cmd, a.out / f"zlora_generate_{steps}.log", a.timeout)
        times[f"gpu_mib_{steps}"] = mem.used_mib()
    return {"wall_8": times[8], "wall_2": times[2], "s_per_step": (times[8] - times[2]) / 6,
            "peak_gpu_mib": times["gpu_mib_8"]}


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def diffusers_generate(a, model: Path, work: Path) -> dict:
    import torch
    from diffusers import ZImagePipeline

    t = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(model, torch_dtype=getattr(torch, a.dims["dtype"])).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t
    times = {}
    for steps in (2, 8, 2):  # the first call warms up
        synchronize(a.device)
        t = time.perf_counter()
        pipe(prompt=PROMPT, height=a.size, width=a.size, num_inference_steps=steps, guidance_scale=0.0,
             generator=torch.Generator(a.device).manual_seed(1)).images[0].save(work / f"diffusers_{steps}.png")
        synchronize(a.device)
        times[steps] = time.perf_counter() - t
    del pipe
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {"load": load, "wall_8": times[8], "wall_2": times[2], "s_per_step": (times[8] - times[2]) / 6}


def train_config(a, model: Path, data: Path, output: Path) -> Path:
    cfg = a.out / "train.toml"
    cfg.write_text(f"""[model]
path = "{model}"
variant = "turbo"
base_dtype = "{'bf16' if a.dims['dtype'] == 'bfloat16' else 'f32'}"

[dataset]
path = "{data}"
resolution = {a.size}
caption_dropout = 0.0

[lora]
rank = 16
alpha = 16

[train]
steps = {a.steps}
learning_rate = {LR}
batch_size = 1
seed = 1
save_every = 1000000
output = "{output}"
gradient_checkpointing = true
""")
    return cfg


def zlora_train(a, model: Path, work: Path) -> dict:
    data, output = work / "dataset", work / "run"
    run([a.zlora, "tiny-dataset", "--out", str(data), "--count", "4", "--size", str(a.size), "--force"],
        a.out / "tiny_dataset.log", a.timeout)
    for txt in data.glob("*.txt"):
        txt.write_text(PROMPT)
    cfg = train_config(a, model, data, output)
    with GpuMemory(a.device == "cuda") as mem:
        wall = run([a.zlora, "train", str(cfg), "--force"], a.out / "zlora_train.log", a.timeout)
    shutil.copy(output / "log.jsonl", a.out / "zlora_train_log.jsonl")
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    steps = [e["step_seconds"] for e in log]
    latents, caps = cached_shapes(data / ".zlora-cache")
    cap_len = max(caps)[0]
    plan = json.loads(subprocess.run([a.zlora, "plan", str(cfg), "--json", "--caption-tokens", str(cap_len)],
                                     capture_output=True, text=True, check=True, env=zlora_env()).stdout)
    return {"wall": wall, "steps": steps, "s_per_step": statistics.median(steps[2:] or steps),
            "peak_gpu_mib": mem.used_mib(), "peak_rss_mib": log[-1]["peak_memory_mib"],
            "gpu_mib_after_steps": [e.get("gpu_memory_mib") for e in log],
            "latent": max(latents), "caption": max(caps), "flops_per_step": plan["flops_per_step"]}


def reference_train(a, model: Path, latent: tuple, caption: tuple) -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    dtype = getattr(torch, a.dims["dtype"])
    dit = ZImageTransformer2DModel.from_pretrained(model / "transformer", torch_dtype=dtype).to(a.device)
    dit.requires_grad_(False)
    dit = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=PATTERN), dit)
    params = [p for n, p in dit.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    dit.enable_gradient_checkpointing()
    dit.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    g = torch.Generator(a.device).manual_seed(0)
    x0 = torch.randn((1, *latent), generator=g, device=a.device, dtype=dtype)
    cap = torch.randn(caption, generator=g, device=a.device, dtype=dtype)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        synchronize(a.device)
        t = time.perf_counter()
        eps = torch.randn(x0.shape, generator=g, device=a.device, dtype=dtype)
        sigma = torch.sigmoid(torch.randn((1,), generator=g, device=a.device))
        x = ((1 - sigma) * x0.float() + sigma * eps.float()).to(dtype)
        with torch.autocast(a.device, dtype=dtype, enabled=dtype != torch.float32):
            out = dit(list(x.unsqueeze(2).unbind(0)), 1 - sigma, [cap], return_dict=False)[0]
        loss = ((torch.stack(out).squeeze(2).float() - (x0.float() - eps.float())) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(a.device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None
    del dit, opt
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {"steps": times, "s_per_step": statistics.median(times[2:] or times), "peak_gpu_mib": peak}


def gpu_peak(a) -> dict:
    import torch

    if a.device != "cuda":
        return {"name": "cpu"}
    name = torch.cuda.get_device_name()
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ x
    torch.cuda.synchronize()
    measured = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
    nominal = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return {"name": name, "matmul_tflops": measured, "nominal_tflops": nominal}


def report(r: dict) -> str:
    rows = ["| measure | zlora | diffusers (+ peft) | zlora / diffusers |", "|---|---:|---:|---:|"]

    def row(what, z, d, fmt="{:.3f}"):
        ok = isinstance(z, (int, float)) and isinstance(d, (int, float)) and d
        rows.append(f"| {what} | {fmt.format(z) if z is not None else '—'} | "
                    f"{fmt.format(d) if d is not None else '—'} | {z / d:.2f} |" if ok else
                    f"| {what} | {z if z is not None else '—'} | {d if d is not None else '—'} | — |")

    zg, dg, zt, rt = (r.get(k, {}) for k in ("zlora_generate", "diffusers_generate", "zlora_train", "reference_train"))
    row("generate: s per denoising step", zg.get("s_per_step"), dg.get("s_per_step"))
    row("generate: wall, 8 steps [s]", zg.get("wall_8"), dg.get("wall_8"))
    row("train: s per step", zt.get("s_per_step"), rt.get("s_per_step"))
    row("train: peak GPU memory [MiB]", zt.get("peak_gpu_mib"), rt.get("peak_gpu_mib"), "{:.0f}")
    gpu, flops = r.get("gpu", {}), zt.get("flops_per_step")
    for name, t in (("zlora", zt.get("s_per_step")), ("reference", rt.get("s_per_step"))):
        if flops and t and gpu.get("nominal_tflops"):
            rows.append(f"| {name} MFU (dense bf16 peak {gpu['nominal_tflops']} TFLOP/s; "
                        f"measured matmul {gpu['matmul_tflops']:.0f}) | {flops / t / 1e12 / gpu['nominal_tflops']:.1%} "
                        f"| {flops / t / 1e12 / gpu['matmul_tflops']:.1%} of measured | |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zlora", default=str(ROOT / "target/release/zlora"))
    p.add_argument("--out", type=Path, default=Path("bench-gpu-out"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zlora-bench-gpu"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="dim 256 at 256 px in f32 (a dry run)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--skip", default="", help="comma-separated stages to skip")
    a = p.parse_args()
    # zlora on the benchmark's device, never a silent fallback to the CPU.
    ENV["ZLORA_DEVICE"] = a.device
    a.dims = SMALL if a.small else REAL
    a.size = a.dims["size"]
    a.out.mkdir(parents=True, exist_ok=True)
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.workdir / "model"
    results: dict = {"argv": sys.argv, "dims": a.dims}
    stages = [
        ("gpu", lambda: gpu_peak(a)),
        ("model", lambda: build_model(a, model)),
        ("zlora_generate", lambda: zlora_generate(a, model, a.workdir)),
        ("diffusers_generate", lambda: diffusers_generate(a, model, a.workdir)),
        ("zlora_train", lambda: zlora_train(a, model, a.workdir)),
        ("reference_train", lambda: reference_train(
            a, model, tuple(results["zlora_train"]["latent"]), tuple(results["zlora_train"]["caption"]))),
    ]
    for name, stage in stages:
        if name in a.skip.split(","):
            continue
        t = time.perf_counter()
        try:
            results[name] = stage()
        except Exception as e:  # report and go on: one broken stage must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        results[name]["stage_seconds"] = time.perf_counter() - t
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        (a.out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
    print()
    print(report(results))


if __name__ == "__main__":
    main()
