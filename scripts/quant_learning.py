#!/usr/bin/env python3
"""Does a LoRA trained on a quantized base learn what the dense base's LoRA learns?

For each format: train the README's tiny recipe (examples/tiny.toml, 200 steps) on a random
tiny model whose widths every format takes, then generate the same seed without and with the
LoRA on that same (quantized) base. Prints the loss curves' agreement and the LoRA effect
(after − before) against the dense run's, and draws a side-by-side sheet: loss curves, and per
format the image before, after and the effect.

    /work/venv/bin/python scripts/quant_learning.py [--zlora target/release/zlora] \
        [--workdir /tmp/quant-learning] [--dim 768 --heads 6] [--sheet docs/img/quant-learning.png]
"""

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMATS = ["none", "q8_0", "int8", "fp8", "q6_k", "q5_k", "q4_k"]
PROMPT = "zkchar, a red circle"
COLOURS = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def run(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def config(work: Path, q: str) -> Path:
    text = (Path(__file__).parent.parent / "examples/tiny.toml").read_text()
    text = text.replace('"demo/model"', f'"{work}/model"')
    text = text.replace('"demo/dataset"', f'"{work}/dataset"')
    text = text.replace('"demo/run"', f'"{work}/run-{q}"')
    text = text.replace("steps = 60", "steps = 200").replace("every = 20", "every = 200")
    if q != "none":
        text = text.replace('base_dtype = "f32"', f'base_dtype = "f32"\nquantize = "{q}"')
    path = work / f"{q}.toml"
    path.write_text(text)
    return path


def losses(work: Path, q: str) -> list:
    return [json.loads(line)["loss"] for line in open(work / f"run-{q}/log.jsonl")]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def generate(zlora, work: Path, q: str, lora: bool) -> np.ndarray:
    out = work / f"{q}-{'after' if lora else 'before'}.png"
    extra = [] if q == "none" else ["--quantize", q]
    extra += ["--lora", work / f"run-{q}/lora.safetensors"] if lora else []
    run(zlora, "generate", "--model", work / "model", "--prompt", PROMPT, "--width", 64,
        "--height", 64, "--seed", 1, "--out", out, "--force", *extra)
    return pixels(out)


def chart(curves: dict, size=(448, 224)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    lo = min(min(c) for c in curves.values())
    hi = max(max(c) for c in curves.values())
    pad = 24
    for (q, c), colour in zip(curves.items(), COLOURS):
        c = np.convolve(c, np.ones(10) / 10, mode="valid")  # a 10-step mean: the curves overlap
        pts = [(pad + i * (size[0] - 2 * pad) / (len(c) - 1),
                size[1] - pad - (v - lo) / (hi - lo) * (size[1] - 2 * pad)) for i, v in enumerate(c)]
        d.line(pts, fill=colour, width=1)
        d.text((size[0] - 70, pad + 12 * list(curves).index(q)), q, fill=colour)
    d.text((pad, 4), f"loss, 10-step mean ({lo:.2f}..{hi:.2f})", fill="black")
    return img


def sheet(curves: dict, images: dict, path: Path):
    cell, scale = 64, 2
    rows = len(images)
    img = Image.new("RGB", (max(448, 3 * cell * scale + 80), 224 + rows * cell * scale), "white")
    img.paste(chart(curves), (0, 0))
    d = ImageDraw.Draw(img)
    for r, (q, (before, after)) in enumerate(images.items()):
        y = 224 + r * cell * scale
        effect = np.clip(np.abs(after - before) * 2, 0, 255)
        for c, a in enumerate([before, after, effect]):
            tile = Image.fromarray(a.astype(np.uint8)).resize((cell * scale, cell * scale), Image.NEAREST)
            img.paste(tile, (80 + c * cell * scale, y))
        d.text((4, y + 4), q, fill="black")
    d.text((80, 212), "before | after | |after - before| x2", fill="black")
    img.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zlora", default="target/release/zlora")
    ap.add_argument("--workdir", default="/tmp/quant-learning")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--sheet")
    a = ap.parse_args()
    zlora, work = Path(a.zlora).resolve(), Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run(zlora, "tiny-model", "--out", work / "model", "--dim", a.dim, "--heads", a.heads, "--force")
    run(zlora, "tiny-dataset", "--out", work / "dataset", "--force")
    curves, images = {}, {}
    for q in a.formats.split(","):
        run(zlora, "train", config(work, q), "--force")
        curves[q] = losses(work, q)
        images[q] = (generate(zlora, work, q, False), generate(zlora, work, q, True))
    dense, (b0, a0) = curves["none"], images["none"]
    e0 = a0 - b0
    print("| Q | loss, mean of steps 1-20 | loss, mean of steps 181-200 | worst step rel. difference "
          "| effect cosine | effect rel. difference | after vs dense after, PSNR |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for q, c in curves.items():
        before, after = images[q]
        e = after - before
        worst = max(abs(x - y) / x for x, y in zip(dense, c))
        cos = (e * e0).sum() / np.sqrt((e * e).sum() * (e0 * e0).sum())
        rel = np.sqrt(((e - e0) ** 2).sum() / (e0 * e0).sum())
        mse = ((after - a0) ** 2).mean()
        psnr = "–" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.1f} dB"
        print(f"| {q} | {np.mean(c[:20]):.4f} | {np.mean(c[-20:]):.4f} | {worst:.2e} | {cos:.4f} "
              f"| {rel:.3f} | {psnr} |")
    if a.sheet:
        sheet(curves, images, Path(a.sheet))
        print("sheet:", a.sheet)


if __name__ == "__main__":
    main()
