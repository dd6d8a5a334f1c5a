#!/usr/bin/env python3
"""Peak memory of a training run with step-0 samples against the same run without them.

A benchmark, not a test (CI does not run it). Needs only Python's standard library and a
release build; run from the repository root:

    python3 scripts/bench_sample_memory.py [--zlora target/release/zlora] [--workdir DIR]
        [--dim 384] [--layers 6] [--heads 6] [--size 512] [--rank 16] [--steps 2]

It writes a random model (`zlora tiny-model`, refiners included) and a synthetic dataset
(`zlora tiny-dataset`) at --size, then trains --steps steps twice with the same config,
`[sample] every = 0` and `every = 1000` (one 2×1 contact sheet at step 0, 8 Turbo steps at
--size), and reads each run's peak RSS (VmHWM, the `peak_memory_mib` of the last log.jsonl
line). Before sampling ran graph-free, the run with samples peaked at 17.2 GB against 0.6 GB
(this configuration, f32, on the CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """[model]
path = "{model}"
variant = "turbo"
base_dtype = "f32"

[dataset]
path = "{dataset}"
resolution = {size}
trigger = "zkchar"

[lora]
rank = {rank}
alpha = {rank}

[train]
steps = {steps}
learning_rate = 1e-4
batch_size = 1
seed = 1
save_every = {steps}
output = "{output}"

[sample]
every = {every}
prompts = ["zkchar, a red circle"]
seeds = [1, 2]
"""


def zlora(binary: str, *args: str) -> None:
    subprocess.run([binary, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def peak_mib(binary: str, work: Path, a: argparse.Namespace, every: int) -> float:
    output = work / f"run-every{every}"
    config = work / f"every{every}.toml"
    config.write_text(
        CONFIG.format(
            model=work / "model",
            dataset=work / "dataset",
            size=a.size,
            rank=a.rank,
            steps=a.steps,
            output=output,
            every=every,
        )
    )
    zlora(binary, "train", str(config), "--force")
    last = (output / "log.jsonl").read_text().strip().splitlines()[-1]
    return float(json.loads(last)["peak_memory_mib"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zlora", default=str(ROOT / "target/release/zlora"))
    p.add_argument("--workdir")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        zlora(a.zlora, "tiny-model", "--out", str(work / "model"), "--dim", str(a.dim),
              "--layers", str(a.layers), "--heads", str(a.heads), "--force")
        zlora(a.zlora, "tiny-dataset", "--out", str(work / "dataset"), "--size", str(a.size),
              "--count", "4", "--force")
        without = peak_mib(a.zlora, work, a, 0)
        with_samples = peak_mib(a.zlora, work, a, 1000)
    print(json.dumps({
        "config": {k: getattr(a, k) for k in ("dim", "layers", "heads", "size", "rank", "steps")},
        "peak_mib_without_samples": round(without, 1),
        "peak_mib_with_step0_samples": round(with_samples, 1),
        "ratio": round(with_samples / without, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
