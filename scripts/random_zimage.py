"""Random-weight Z-Image models with the real diffusers / transformers classes: the byte-level
tokenizer with Qwen3's chat template and the weight initialisation shared by
scripts/make_fixtures.py (test fixtures), bench_generate.py, bench_train.py and bench_gpu.py.
"""

from __future__ import annotations

import math

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BPE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "w")]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randomize_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Re-initialise every parameter so that no weight is 0 or 1 by construction.

    norm weights  <- 1 + 0.1 * randn        norm/linear/conv biases <- 0.1 * randn
    pad tokens    <- randn                  embedding tables        <- randn
    other weights <- gain * randn / sqrt(fan_in)  (fan_in = numel of one output row)
    """
    g = gen(seed)
    norm_params = set()
    emb_params = set()
    for mname, m in module.named_modules():
        tname = type(m).__name__
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if "Norm" in tname:
                norm_params.add(full)
            if isinstance(m, torch.nn.Embedding):
                emb_params.add(full)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name in norm_params:
            new = 1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r
        elif "pad_token" in name or name in emb_params:
            new = r
        elif name.endswith("bias") or p.ndim == 1:
            new = 0.1 * r
        else:
            fan_in = p[0].numel()
            new = gain * r / math.sqrt(fan_in)
        p.data.copy_(new.to(p.dtype))
        assert (p != 0).all() and (p != 1).all(), name


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen ByteLevel byte -> printable unicode char table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer() -> PreTrainedTokenizerFast:
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}  # token id == byte value for the 256 byte tokens
    for a, b in BPE_MERGES:
        vocab[a + b] = len(vocab)
    bpe = models.BPE(vocab=vocab, merges=BPE_MERGES, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="right",
        model_max_length=131072,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def chat(tok, prompt: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
