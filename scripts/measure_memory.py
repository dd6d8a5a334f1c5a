#!/usr/bin/env python
"""Peak memory of `zlora train` on the CPU against `zlora plan`'s CPU profile, over a spread of
model widths, depths, resolutions, LoRA targets, dtypes and checkpointing.

A measurement, not a test. Run from the repository root after `cargo build --release`
(no Python packages needed):

    python3 scripts/measure_memory.py [--zlora target/release/zlora] [--workdir DIR]
        [--only NAME,...] [--csv crates/zlora/src/plan/measured_memory.csv]

Each run: a random-weight model (`zlora tiny-model`, with --real-vae or --real-width), a
synthetic dataset of two square images (`zlora tiny-dataset --count 2 --size R`), a config
with `steps = 2`, samples off, checkpoints only at the end. The first run of each model on
each dataset (1 step) fills the latent and caption cache; the measured run finds everything
cached and never loads the encoders. Measured: the process's peak RSS (VmHWM, as
scripts/bench_train.py reads it) over the whole run (`measured_mib`), and over the second step
alone (`training_mib`: the high-water mark is reset once the first step is logged), so the
training phase is measured even where loading peaks higher. Predicted: the CPU phases of
`zlora plan CONFIG --json --caption-tokens N`, N the longest cached caption; the largest phase
a cached run goes through, and the training phase.

Every run is listed in RUNS with its role: "fit" runs were used to set the memory model's
fitted constants, "held-out" runs were not; crates/zlora/src/plan/calibration.rs checks the
model against every row of the CSV this writes (docs/benchmarks.md, "calibration").
"""

from __future__ import annotations

import argparse
import csv
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import ROOT, in_workdir, run_env  # noqa: E402
from bench_train import run_child  # noqa: E402

ATTENTION = '["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]'
EVERYTHING = ('stacks = ["layers", "noise_refiner", "context_refiner"]\n'
              'modules = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", '
              '"feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"]')
TARGETS = {"default": "", "attention": f"modules = {ATTENTION}", "all": EVERYTHING}
FIELDS = ["role", "model", "dim", "heads", "layers", "refiners", "vae", "resolution", "batch",
          "checkpointing", "base_dtype", "rank", "targets", "blocks_on_device", "threads", "caption_tokens",
          "measured_mib", "training_mib"]


def run(role, dim, heads, layers, res, *, refiners=2, vae="real", batch=1, ckpt=False, dtype="f32", rank=16,
        targets="default", model=None, swap=None):
    """`swap`: `[model] blocks_on_device` (None: unset, every block resident)."""
    return dict(role=role, model=model or "tiny", dim=dim, heads=heads, layers=layers, refiners=refiners, vae=vae,
                resolution=res, batch=batch, checkpointing=ckpt, base_dtype=dtype, rank=rank, targets=targets,
                blocks_on_device="" if swap is None else swap)


def real(role, dtype, ckpt, layers=2, swap=None):
    """Z-Image's widths with few main layers (`tiny-model --real-width`), saved in the run's
    dtype."""
    return run(role, 3840, 30, layers, 512, dtype=dtype, ckpt=ckpt, model="real-width", swap=swap)


# The spread. Widths 128-768 (heads of 64) and the real 3840, 2-8 layers, 256-512 px with the
# real VAE (256 or 1024 image tokens), the tiny VAE's 4096 tokens at 512 px, both dtypes, both
# checkpointing modes, three target sets.
RUNS = [
    run("fit", 128, 2, 2, 256),
    run("fit", 128, 2, 2, 256, ckpt=True),
    run("fit", 256, 4, 4, 512),
    run("fit", 256, 4, 4, 512, ckpt=True),
    run("fit", 512, 8, 2, 512, dtype="bf16"),
    run("fit", 512, 8, 2, 512, ckpt=True, dtype="bf16"),
    run("fit", 768, 12, 2, 256, targets="all"),
    run("fit", 768, 12, 2, 256, ckpt=True, targets="all"),
    run("fit", 384, 6, 8, 512, targets="attention"),
    run("fit", 384, 6, 8, 512, ckpt=True, targets="attention"),
    run("fit", 128, 2, 2, 512, vae="tiny", refiners=1),
    run("fit", 256, 4, 2, 256, batch=2, ckpt=True, dtype="bf16"),
    run("held-out", 384, 6, 6, 512),
    run("held-out", 384, 6, 6, 512, ckpt=True),
    run("held-out", 640, 10, 3, 512, dtype="bf16"),
    run("held-out", 640, 10, 3, 512, ckpt=True, dtype="bf16", targets="all"),
    run("held-out", 192, 3, 6, 384, targets="attention"),
    run("held-out", 192, 3, 6, 384, ckpt=True, batch=2),
    run("held-out", 512, 8, 4, 256, targets="all"),
    run("held-out", 256, 4, 3, 512, vae="tiny", refiners=1, ckpt=True),
    real("fit", "f32", True),
    real("held-out", "f32", False),
    real("fit", "bf16", True),
    real("held-out", "bf16", False),
    # One more layer: what a layer adds, against the plan's per-layer figures.
    real("held-out", "bf16", True, layers=3),
    real("held-out", "bf16", False, layers=3),
    # Block swap with every main layer swapped: on the CPU host and device are one memory, so
    # the weights stay and the two fetched copies in flight add to them.
    real("held-out", "bf16", True, layers=3, swap=0),
]


def key(r: dict) -> str:
    return (f"{r['model']}-d{r['dim']}-h{r['heads']}-l{r['layers']}-rf{r['refiners']}-{r['vae']}-r{r['resolution']}-b{r['batch']}-"
            f"{'ckpt' if r['checkpointing'] else 'full'}-{r['base_dtype']}-{r['targets']}"
            + (f"-swap{r['blocks_on_device']}" if r["blocks_on_device"] != "" else ""))


def model_dir(a, work: Path, r: dict) -> Path:
    """The model of a run, written once per shape (the real-width one in the run's dtype)."""
    if r["model"] == "real-width":
        path = work / f"model-real-width-l{r['layers']}-{r['base_dtype']}"
        cmd = ["--real-width"] + (["--bf16"] if r["base_dtype"] == "bf16" else [])
    else:
        path = work / f"model-d{r['dim']}-h{r['heads']}-l{r['layers']}-rf{r['refiners']}-{r['vae']}"
        cmd = ["--dim", str(r["dim"]), "--heads", str(r["heads"]), "--refiners", str(r["refiners"])]
        cmd += ["--real-vae"] if r["vae"] == "real" else []
    if not path.exists():
        run_child([a.zlora, "tiny-model", "--out", str(path), "--layers", str(r["layers"])] + cmd, run_env(a.threads))
    return path


def dataset_dir(a, work: Path, size: int) -> Path:
    path = work / f"data-{size}"
    if not path.exists():
        cmd = [a.zlora, "tiny-dataset", "--out", str(path), "--count", "2", "--size", str(size)]
        run_child(cmd, run_env(a.threads))
    return path


def train_config(path: Path, model: Path, data: Path, output: Path, r: dict, steps: int) -> Path:
    path.write_text(f"""[model]
path = "{model}"
variant = "turbo"
base_dtype = "{r['base_dtype']}"
{"" if r["blocks_on_device"] == "" else f"blocks_on_device = {r['blocks_on_device']}"}

[dataset]
path = "{data}"
resolution = {r['resolution']}

[lora]
rank = {r['rank']}
alpha = {r['rank']}
{TARGETS[r['targets']]}

[train]
steps = {steps}
learning_rate = 1e-4
batch_size = {r['batch']}
seed = 1
save_every = 1000000
output = "{output}"
gradient_checkpointing = {str(r['checkpointing']).lower()}
""")
    return path


def safetensors_shapes(path: Path) -> list[list[int]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON)."""
    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return [v["shape"] for k, v in header.items() if k != "__metadata__"]


def caption_tokens(data: Path) -> int:
    """The longest cached caption (2-D caption features; latents are 3-D)."""
    return max(s[0] for f in (data / ".zlora-cache").rglob("*.safetensors")
               for s in safetensors_shapes(f) if len(s) == 2)


def vm_hwm_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def train_peaks(a, config: Path, output: Path) -> tuple[float, float]:
    """Peak RSS of a whole `zlora train` run, and of its second step alone: once the first
    step is logged the process's high-water mark is reset (writing 5 to clear_refs), so the
    last `peak_memory_mib` of log.jsonl (its VmHWM) is the training phase's peak even where
    loading the weights (files mapped while they are copied) peaked higher."""
    log = output / "log.jsonl"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([a.zlora, "train", str(config), "--force"], env=run_env(a.threads),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    before = 0.0
    while proc.poll() is None and not (log.exists() and log.read_text().strip()):
        time.sleep(0.05)
    if proc.poll() is None:
        before = vm_hwm_mib(proc.pid)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"zlora train {config} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = log.read_text().splitlines()
    first, last = json.loads(lines[0])["peak_memory_mib"], json.loads(lines[-1])["peak_memory_mib"]
    return max(before, first, last), last


def plan_phases(a, config: Path, tokens: int) -> dict[str, dict[str, float]]:
    """The CPU profile's phases of `zlora plan`: name -> item -> MiB."""
    out = run_child([a.zlora, "plan", str(config), "--json", "--caption-tokens", str(tokens)], run_env(a.threads))
    return {p["name"]: {i["what"]: i["bytes"] / 2**20 for i in p["items"]} for p in json.loads(out)["cpu"]["phases"]}


def predicted_mib(phases: dict[str, dict[str, float]]) -> tuple[float, str]:
    """The largest phase a cached run goes through (the encoders never load)."""
    return max((sum(items.values()), name) for name, items in phases.items() if "(cache)" not in name)


def measure(a, work: Path, r: dict, cached: set) -> dict:
    model, data = model_dir(a, work, r), dataset_dir(a, work, r["resolution"])
    name = key(r)
    # A first run of each model on each dataset fills the cache (1 step); the measured run
    # finds everything cached.
    if (model, data) not in cached:
        warm = train_config(work / f"{name}-cache.toml", model, data, work / "runs" / f"{name}-cache", r, 1)
        run_child([a.zlora, "train", str(warm), "--force"], run_env(a.threads))
        cached.add((model, data))
    config = train_config(work / f"{name}.toml", model, data, work / "runs" / name, r, 2)
    t = time.perf_counter()
    measured, training = train_peaks(a, config, work / "runs" / name)
    wall = time.perf_counter() - t
    tokens = caption_tokens(data)
    phases = plan_phases(a, config, tokens)
    predicted, phase = predicted_mib(phases)
    with (work / "plan-items.jsonl").open("a") as f:
        f.write(json.dumps(dict(r, name=name, measured_mib=measured, training_mib=training, phases=phases)) + "\n")
    planned_training = sum(phases["training"].values())
    print(f"{r['role']:8} {name}: measured {measured:.1f} MiB, plan {predicted:.1f} MiB ({phase}), "
          f"{predicted / measured - 1:+.1%}; step 2 alone {training:.1f} MiB, plan's training phase "
          f"{planned_training:.1f} MiB, {planned_training / training - 1:+.1%}; {wall:.0f} s", flush=True)
    return dict(r, threads=a.threads, caption_tokens=tokens, measured_mib=round(measured, 1),
                training_mib=round(training, 1))


def as_text(row: dict) -> dict[str, str]:
    return {k: str(row[k]).lower() if isinstance(row[k], bool) else str(row[k]) for k in FIELDS}


def write_csv(path: Path, rows: list[dict]) -> None:
    """Writes the measured rows into the CSV, replacing earlier measurements of the same runs
    and keeping the others."""
    config = FIELDS[:FIELDS.index("caption_tokens")]
    new = [as_text(r) for r in rows]
    mine = {tuple(r[k] for k in config) for r in new}
    old = []
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
        old = [r for r in csv.DictReader(lines) if tuple(r[k] for k in config) not in mine]
    with path.open("w", newline="") as f:
        f.write("# Peak RSS (VmHWM) of `zlora train`, 2 steps, CPU; written by scripts/measure_memory.py\n")
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(old + new)


def main_in(a, work: Path) -> None:
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    cached: set = set()
    rows = [measure(a, work, r, cached) for r in RUNS if not a.only or key(r) in a.only]
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    if a.csv:
        write_csv(a.csv, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zlora", default=str(ROOT / "target/release/zlora"))
    p.add_argument("--workdir", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", type=lambda s: s.split(","), help="comma-separated run names (as printed)")
    p.add_argument("--csv", type=Path, help="write the measured rows here")
    in_workdir(p.parse_args(), main_in)


if __name__ == "__main__":
    main()
