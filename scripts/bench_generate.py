#!/usr/bin/env python
"""Inference benchmark: `zlora generate` against diffusers' ZImagePipeline on the CPU.

A benchmark, not a test (CI does not run it). Run from the repository root after
`cargo build --release`:

    /work/venv/bin/python scripts/bench_generate.py [--zlora target/release/zlora]
        [--baseline OTHER_ZLORA] [--workdir DIR] [--reps 3] [--threads 2]

It builds (in a temporary folder, or --workdir) a random-weight Z-Image model with the real
diffusers / transformers classes, in the diffusers layout both programs read:

    transformer   dim 256, 4 main + 2 refiner layers, 4 heads of 64 (axes_dims 16/24/24),
                  caption features 128                                (8.5 M parameters)
    text encoder  Qwen3, hidden 128, 4 layers, 4 heads / 2 KV heads of 32, MLP 384 (0.8 M)
    VAE           AutoencoderKL, block_out_channels 16/32/32/32 (8x), 2 resnets per
                  encoder block (3 per decoder block), 8 groups, mid-block attention
                                                                (decoder: 0.26 M parameters)
    tokenizer     byte-level BPE with the chat template of scripts/make_fixtures.py

and one initial-latents file (1, 16, 32, 32). Then, interleaved over --reps repetitions,
each in a fresh process with the same thread count (candle: RAYON_NUM_THREADS; torch:
torch.set_num_threads and OMP/MKL_NUM_THREADS), it times a 256x256 image at guidance 0
from those latents:

    zlora      the CLI: the whole process (load + prompt + denoise + VAE decode + PNG);
               --baseline adds a second zlora binary (before/after comparisons)
    diffusers  ZImagePipeline.from_pretrained (float32, CPU) + pipe(...) + PNG save, timed
               inside the worker process (the Python/torch import time is reported apart)

once with 8 steps and once with 1 step, as wall time and as CPU time (user + system, all
threads). Denoising alone is estimated as (median(8 steps) - median(1 step)) * 8/7. Both 8-step
runs write their final latents (before VAE decoding); their max abs difference shows that the
work compared is the same. Prints a table of medians and the ratios zlora / diffusers (below 1
means zlora is faster), and the load average: on a shared machine the wall times depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a rocky coast at sunset, waves crashing below, warm golden light"
SIZE = 256
LATENT = SIZE // 8
LATENTS_SEED = 7

TE_CFG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
)
DIT_CFG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=256,
    n_layers=4,
    n_refiner_layers=2,
    n_heads=4,
    n_kv_heads=4,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=128,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[16, 24, 24],  # sum = head_dim = 256 / 4
    axes_lens=[1536, 512, 512],
)
VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=[16, 32, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=8,
    act_fn="silu",
    mid_block_add_attention=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    sample_size=SIZE,
)
SCHED_CFG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


QUIET = dict(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    DIFFUSERS_VERBOSITY="error",
    TRANSFORMERS_VERBOSITY="error",
    CUDA_VISIBLE_DEVICES="",
)


def run_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {**os.environ, **QUIET, "RAYON_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
def build_model(model_dir: Path, latents_file: Path) -> dict[str, int]:
    """Random model in the diffusers layout + the initial latents; returns parameter counts."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    sys.path.insert(0, str(ROOT / "scripts"))
    from random_zimage import build_tokenizer, randomize_

    tok = build_tokenizer()
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TE_CFG)).eval()
    dit = ZImageTransformer2DModel(**DIT_CFG).eval()
    vae = AutoencoderKL(**VAE_CFG).eval()
    for seed, module in enumerate([te, dit, vae], start=1):
        randomize_(module, seed=seed)
    sched = FlowMatchEulerDiscreteScheduler(**SCHED_CFG)
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=dit)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    noise = torch.randn(1, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(LATENTS_SEED))
    save_file({"latents": noise.contiguous()}, str(latents_file))
    sizes = {"transformer": dit, "text_encoder": te, "vae_decoder": vae.decoder}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in sizes.items()}


# --------------------------------------------------------------------------------------
# diffusers worker (a fresh process per run)
# --------------------------------------------------------------------------------------
def diffusers_worker(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    import torch
    from diffusers import ZImagePipeline
    from diffusers.utils import logging as dlog
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    dlog.set_verbosity_error()
    t_import = time.perf_counter() - t0
    latents = load_file(a.latents)["latents"]

    wall, cpu = time.perf_counter(), time.process_time()
    pipe = ZImagePipeline.from_pretrained(a.model, torch_dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_last(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    image = pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=a.steps,
        guidance_scale=0.0,
        latents=latents.clone(),
        output_type="pil",
        callback_on_step_end=keep_last,
    ).images[0]
    image.save(a.out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if a.save_latents:
        save_file({"latents": final["latents"].float().contiguous()}, a.save_latents)
    print(json.dumps({"wall": wall, "cpu": cpu, "import": t_import, "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------
def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_zlora(binary: str, a, model: Path, latents: Path, steps: int, out: Path, save: Path | None) -> dict:
    cmd = [binary, "generate", "--model", str(model), "--prompt", PROMPT, "--width", str(SIZE),
           "--height", str(SIZE), "--steps", str(steps), "--guidance", "0", "--latents", str(latents),
           "--out", str(out), "--force"]
    if save:
        cmd += ["--save-latents", str(save)]
    wall, cpu = time.perf_counter(), children_cpu()
    subprocess.run(cmd, check=True, env=run_env(a.threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"wall": time.perf_counter() - wall, "cpu": children_cpu() - cpu}


def run_diffusers(a, model: Path, latents: Path, steps: int, out: Path, save: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--latents", str(latents),
           "--steps", str(steps), "--threads", str(a.threads), "--out", str(out)]
    if save:
        cmd += ["--save-latents", str(save)]
    res = subprocess.run(cmd, check=True, env=run_env(a.threads), capture_output=True, text=True)
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["threads"] == a.threads, d
    return d


def max_abs_diff(p: Path, q: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(p))["latents"], load_file(str(q))["latents"]
    assert x.shape == y.shape, (x.shape, y.shape)
    return float((x.float() - y.float()).abs().max())


def bench(a: argparse.Namespace, work: Path) -> None:
    model, latents = work / "model", work / "latents.safetensors"
    sizes = build_model(model, latents)
    print(f"model in {model}; parameters: {sizes}")
    print(f"threads: {a.threads} (candle: RAYON_NUM_THREADS; torch: set_num_threads); reps: {a.reps}")
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    runners = {"zlora": partial(run_zlora, a.zlora)}
    if a.baseline:
        runners["baseline"] = partial(run_zlora, a.baseline)
    runners["diffusers"] = run_diffusers
    runs: dict[tuple[str, int], list[dict]] = {(n, s): [] for n in runners for s in (8, 1)}
    for rep in range(a.reps):
        for steps in (8, 1):
            for name, run in runners.items():
                save = work / f"{name}_{rep}.safetensors" if steps == 8 else None
                runs[(name, steps)].append(run(a, model, latents, steps, work / f"{name}.png", save))
        print(f"rep {rep + 1}: " + ", ".join(f"{n} {s} steps {v[-1]['wall']:.3f}s" for (n, s), v in runs.items()),
              flush=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    report(runs, list(runners))
    for name in runners:
        if name != "diffusers":
            diff = max(max_abs_diff(work / f"{name}_{r}.safetensors", work / f"diffusers_{r}.safetensors")
                       for r in range(a.reps))
            print(f"final latents, max abs diff {name} vs diffusers: {diff:.2e}")


def report(runs: dict[tuple[str, int], list[dict]], names: list[str]) -> None:
    med = {(n, s, m): statistics.median(r[m] for r in v) for (n, s), v in runs.items() for m in ("wall", "cpu")}
    ratios = [("zlora", "diffusers")] + ([("zlora", "baseline")] if "baseline" in names else [])
    print()
    print("| median of the runs | " + " | ".join(f"{n} [s]" for n in names) + " | "
          + " | ".join(f"{x} / {y}" for x, y in ratios) + " |")
    print("|---|" + "---:|" * (len(names) + len(ratios)))
    for m in ("wall", "cpu"):
        rows = {
            "end to end, 8 steps": {n: med[(n, 8, m)] for n in names},
            "end to end, 1 step": {n: med[(n, 1, m)] for n in names},
            "denoising, 8 steps (from 8 − 1 steps)": {n: (med[(n, 8, m)] - med[(n, 1, m)]) * 8 / 7 for n in names},
        }
        for row, t in rows.items():
            cells = [f"{t[n]:.3f}" for n in names] + [f"{t[x] / t[y]:.2f}" for x, y in ratios]
            print(f"| {row}, {m} time | " + " | ".join(cells) + " |")
    imports = statistics.median(r["import"] for s in (8, 1) for r in runs[("diffusers", s)])
    print()
    print(f"diffusers worker import time (not included above): {imports:.2f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zlora", default=str(ROOT / "target/release/zlora"))
    p.add_argument("--baseline", help="a second zlora binary (say, an older build) timed in the same runs")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    # internal: one diffusers run in a fresh process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--latents", "--out", "--save-latents"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.update(QUIET)
    if a.worker:
        diffusers_worker(a)
        return
    in_workdir(a, bench)


def in_workdir(a, run) -> None:
    """Runs `run(a, folder)` in --workdir, or in a temporary folder removed afterwards."""
    if a.workdir:
        a.workdir.mkdir(parents=True, exist_ok=True)
        run(a, a.workdir)
    else:
        with tempfile.TemporaryDirectory() as td:
            run(a, Path(td))


if __name__ == "__main__":
    main()
