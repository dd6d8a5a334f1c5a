"""`zlora caption` against transformers on the same CPU, model and images (docs/benchmarks.md).

Builds a random-weight Qwen3-VL at Qwen3-VL-2B's widths (vision 1024 wide with 16 heads and
the 2304-entry position grid, text 2048 wide with 16/8 heads of 128 and M-RoPE [24, 20, 20])
but only `--vision-depth` vision blocks and `--text-layers` decoder layers, with the fixture's
small tokenizer (so the vocabulary, and the lm_head, are small), then captions the same
images with both: transformers' processor + `generate` (greedy) in this process, and the
zlora binary in a child process (`/usr/bin/time -v` for its peak memory). Both times include
loading the model; both decode the same number of tokens (they are at parity, and the run
checks that the captions match).

Run: /work/venv/bin/python scripts/bench_caption.py --zlora target/release/zlora
"""

import argparse
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from make_caption_fixtures import processor_without_video

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "caption" / "model"
PROMPT = "Describe this image in one short sentence."


def build(out: Path, vision_depth: int, text_layers: int) -> None:
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    base = Qwen3VLConfig.from_pretrained(FIXTURE)
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=base.text_config.vocab_size,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=text_layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=32768,
            rope_parameters=dict(
                rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True
            ),
            eos_token_id=base.text_config.eos_token_id,
            pad_token_id=base.text_config.pad_token_id,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            patch_size=16,
            out_hidden_size=2048,
            num_position_embeddings=2304,
            deepstack_visual_indexes=list(range(min(3, vision_depth))),
        ),
        image_token_id=base.image_token_id,
        video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [cfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy(FIXTURE / "chat_template.jinja", out / "chat_template.jinja")


def write_processor(out: Path, max_pixels: int) -> None:
    """Qwen3-VL's processor settings, with max_pixels at the benchmark images' area."""
    Qwen2VLImageProcessorPil(
        size={"shortest_edge": 65536, "longest_edge": max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out)


def images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


def transformers_run(model_dir: Path, paths: list[Path], tokens: int):
    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    processor = processor_without_video(proc, tok)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    captions = []
    with torch.no_grad():
        for path in paths:
            inputs = processor(text=[text], images=[Image.open(path)], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            captions.append(tok.decode(new, skip_special_tokens=True).strip())
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return seconds, peak_mib, captions


def zlora_run(binary: str, model_dir: Path, folder: Path, max_pixels: int, tokens: int):
    cmd = ["/usr/bin/time", "-v", binary, "caption", str(folder), "--model", str(model_dir),
           "--prompt", PROMPT, "--max-tokens", str(tokens), "--max-pixels", str(max_pixels),
           "--dry-run"]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    captions = [line.split(": ", 1)[1] if ": " in line else "" for line in run.stdout.splitlines()]
    return seconds, peak_kib / 1024, captions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zlora", default=str(ROOT / "target" / "release" / "zlora"))
    ap.add_argument("--work", default="/tmp/zlora-caption-bench")
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", default="512x384")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    work = Path(args.work)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build(model_dir, args.vision_depth, args.text_layers)
    if args.build_only:
        return
    width, height = map(int, args.size.split("x"))
    folder = work / "images"
    paths = images(folder, args.images, width, height)
    max_pixels = width * height
    write_processor(model_dir, max_pixels)
    zs, zmem, zcap = zlora_run(args.zlora, model_dir, folder, max_pixels, args.tokens)
    ts, tmem, tcap = transformers_run(model_dir, paths, args.tokens)
    print("same captions:", zcap == tcap)
    print(f"| zlora | {args.images / zs:.3f} images/s | {zs:.1f} s | {zmem:.0f} MiB |")
    print(f"| transformers | {args.images / ts:.3f} images/s | {ts:.1f} s | {tmem:.0f} MiB |")


if __name__ == "__main__":
    main()
