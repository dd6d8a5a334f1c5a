"""Fixtures for `zlora caption`'s parity tests (crates/zlora/tests/caption_parity.rs).

Builds a tiny random-weight Qwen3-VL with transformers' own classes and saves it as a model
folder (model.safetensors, config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, preprocessor_config.json, chat_template.jinja) under
fixtures/caption/model/. The real Qwen3-VL tokenizer cannot be downloaded here, so the folder
carries a small byte-level BPE trained on a few sentences with Qwen's special tokens; the real
tokenizer.json has the same structure (byte-level BPE + added special tokens) and loads through
the same code. For two images of different aspect ratios (one above max_pixels, one below
min_pixels, so both branches of smart_resize run) it records, through the processor and
`generate`: pixel_values, image_grid_thw, input_ids, the first step's logits and the greedy
tokens of a 30-token generation (fixtures/caption/IMAGE.safetensors); and both images through
one batched, left-padded `generate` (fixtures/caption/batch.safetensors).

Run: /work/venv/bin/python scripts/make_caption_fixtures.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    ProcessorMixin,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "caption"
MODEL = OUT / "model"
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The chat template of Qwen3-VL Instruct, reduced to what captioning sends: one user turn
# holding images and text, no default system message, then the assistant's turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "Describe this image in one detailed paragraph for a training caption.",
    "List the visible things in this image as comma-separated tags.",
    "Describe this image in one short sentence.",
    "a photo of a red cat sitting on a wooden table near a window, soft light",
    "portrait of a woman with short hair, blue jacket, city street at night",
    "landscape, mountains, lake, trees, snow, clouds, sunset, reflection",
]
PROMPT = "Describe this image in one short sentence."


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config(tok: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            # 8 frequencies: T keeps 0, 3, 6, 7; H takes 1, 4; W takes 2, 5 (interleaved).
            rope_parameters=dict(
                rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2], mrope_interleaved=True
            ),
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth gradient with noise, so resampling has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def processor_without_video(images, tok) -> Qwen3VLProcessor:
    """Qwen3VLProcessor for images only: its video processor needs torchvision, which this venv
    lacks, and the processor's class check trips over the missing video mapping."""
    check = ProcessorMixin.check_argument_for_proper_class

    def skip_absent(self, name, arg):
        return None if arg is None else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = skip_absent
    try:
        return Qwen3VLProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def main() -> None:
    torch.manual_seed(0)
    MODEL.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    cfg = config(tok)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    # Random init leaves norms at one and biases at zero; perturb every tensor so that each
    # weight matters to the comparison.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.eos_token_id = [cfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.save_pretrained(MODEL, safe_serialization=True)

    # Qwen3-VL's processor values (patch 16, merge 2, mean/std 0.5) with a small pixel range.
    images = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = processor_without_video(images, tok)
    images.save_pretrained(MODEL)
    tok.save_pretrained(MODEL)

    for name, (w, h, seed) in {"wide": (200, 120, 1), "tall": (40, 90, 2)}.items():
        picture = image(w, h, seed)
        picture.save(OUT / f"{name}.png")
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.open(OUT / f"{name}.png")], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        tokens = out[0, inputs["input_ids"].shape[1] :]
        print(name, tuple(inputs["image_grid_thw"][0].tolist()), "tokens", len(tokens))
        save_file(
            {
                "pixel_values": inputs["pixel_values"].float().contiguous(),
                "image_grid_thw": inputs["image_grid_thw"].to(torch.int64).contiguous(),
                "input_ids": inputs["input_ids"][0].to(torch.int64).contiguous(),
                "logits": logits.float().contiguous(),
                "tokens": tokens.to(torch.int64).contiguous(),
            },
            OUT / f"{name}.safetensors",
            metadata={"prompt": PROMPT, "text": tok.decode(tokens, skip_special_tokens=True)},
        )
    batch(model, processor, tok)
    (OUT / "prompt.json").write_text(json.dumps({"prompt": PROMPT}) + "\n")


def batch(model, processor, tok) -> None:
    """Both images in one `generate` call, the shorter prompt left-padded as transformers does
    for decoder-only models; records each row's tokens up to its end token."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(OUT / f"{name}.png") for name in ("wide", "tall")]
    tok.padding_side = "left"
    inputs = processor(text=[text, text], images=pictures, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    tokens = out[:, inputs["input_ids"].shape[1] :]
    end = model.generation_config.eos_token_id[0]
    rows = {}
    for i, (name, row) in enumerate(zip(("wide", "tall"), tokens.tolist())):
        rows[name] = torch.tensor(row[: row.index(end)] if end in row else row, dtype=torch.int64)
        padding = int((inputs["attention_mask"][i] == 0).sum())
        print("batch", name, "padding", padding, "tokens", len(rows[name]))
    save_file(rows, OUT / "batch.safetensors", metadata={"prompt": PROMPT})


if __name__ == "__main__":
    main()
