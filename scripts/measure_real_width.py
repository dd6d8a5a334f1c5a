#!/usr/bin/env python
"""`zlora generate` on random-weight models of Z-Image's real widths, on the CPU: wall time and
peak RSS, next to `zlora plan`'s CPU phases for the same model.

A measurement, not a test. Run from the repository root after `cargo build --release` (no
Python packages needed; GNU time measures the peak RSS):

    python3 scripts/measure_real_width.py [--zlora target/release/zlora] [--workdir DIR]
        [--layers 2] [--size 512] [--steps 2] [--full-size]

generate   `zlora tiny-model --real-width --layers L` (dim 3840, 30 heads, FFN 10240, 2 + 2
           refiner blocks, caption projector from 2560, a 2-layer text encoder of Qwen3-4B's
           width, the real VAE), saved in f32 and in bf16; `zlora generate` at --size px,
           --steps steps, guidance 0, computing in the saved dtype.
full size  (--full-size) the 30-layer transformer in bf16 (12.3 GB on disk, sharded), loaded
           by the normal loader (memory-mapped files), one denoising step at 256 px in bf16;
           the model folder is deleted afterwards.

Training at these widths is measured by scripts/measure_memory.py (its real-width rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPT, ROOT, in_workdir, run_env  # noqa: E402
from bench_train import run_child  # noqa: E402


def model(a, work: Path, layers: int, dtype: str) -> Path:
    path = work / f"model-real-width-l{layers}-{dtype}"
    if not path.exists():
        cmd = [a.zlora, "tiny-model", "--out", str(path), "--real-width", "--layers", str(layers)]
        run_child(cmd + (["--bf16"] if dtype == "bf16" else []), run_env(a.threads))
    return path


def timed(a, cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command, from GNU time."""
    res = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], env=run_env(a.threads), capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:2]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    wall, kib = res.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kib) / 1024


def plan_phases(a, work: Path, path: Path, dtype: str, size: int) -> dict[str, float]:
    """The CPU profile's phase totals (MiB) for training this model at `size` (rank 16,
    checkpointing): its loading phase is what a generate holds while the transformer loads."""
    cfg = work / f"plan-{path.name}-{size}.toml"
    cfg.write_text(f'[model]\npath = "{path}"\nvariant = "turbo"\nbase_dtype = "{dtype}"\n'
                   f'[dataset]\npath = "{work}"\nresolution = {size}\n[lora]\nrank = 16\nalpha = 16\n'
                   f'[train]\nsteps = 1\nlearning_rate = 1e-4\noutput = "{work / "run"}"\n')
    out = run_child([a.zlora, "plan", str(cfg), "--json", "--caption-tokens", "52"], run_env(a.threads))
    return {p["name"]: sum(i["bytes"] for i in p["items"]) / 2**20 for p in json.loads(out)["cpu"]["phases"]}


def generate(a, path: Path, work: Path, dtype: str, size: int, steps: int) -> tuple[float, float]:
    return timed(a, [a.zlora, "generate", "--model", str(path), "--prompt", PROMPT, "--width", str(size),
                     "--height", str(size), "--steps", str(steps), "--guidance", "0", "--seed", "1",
                     "--dtype", dtype, "--out", str(work / f"{path.name}-{size}.png"), "--force"])


def report(what: str, wall: float, peak: float, phases: dict[str, float]) -> None:
    shown = ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
    print(f"{what}: {wall:.1f} s, peak RSS {peak:.0f} MiB; plan's CPU phases (MiB): {shown}", flush=True)


def main_in(a, work: Path) -> None:
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    for dtype in a.dtypes:
        path = model(a, work, a.layers, dtype)
        wall, peak = generate(a, path, work, dtype, a.size, a.steps)
        report(f"generate {a.layers} layers {dtype} {a.size} px {a.steps} steps", wall, peak,
               plan_phases(a, work, path, dtype, a.size))
    if a.full_size:
        path = model(a, work, 30, "bf16")
        try:
            wall, peak = generate(a, path, work, "bf16", 256, 1)
            report("generate 30 layers bf16 256 px 1 step", wall, peak, plan_phases(a, work, path, "bf16", 256))
        finally:
            shutil.rmtree(path)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zlora", default=str(ROOT / "target/release/zlora"))
    p.add_argument("--workdir", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtypes", type=lambda s: [d for d in s.split(",") if d], default=["f32", "bf16"],
                   help="model dtypes to generate with (comma-separated; empty for none)")
    p.add_argument("--full-size", action="store_true")
    in_workdir(p.parse_args(), main_in)


if __name__ == "__main__":
    main()
