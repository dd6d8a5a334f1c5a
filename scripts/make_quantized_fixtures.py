#!/usr/bin/env python
"""Quantized transformer files as other tools write them, from the tiny ComfyUI fixture
(`fixtures/tiny/comfy_transformer.safetensors`, bf16, ComfyUI names), for zlora's loader tests.

Run from the repository root (CPU, a few seconds; deterministic):

    /work/venv/bin/python scripts/make_quantized_fixtures.py

It rewrites `fixtures/quantized/`:

- `comfy_gguf.gguf`: a GGUF written with the `gguf` package (llama.cpp's) in ComfyUI-GGUF's
  Z-Image layout: architecture `lumina2`, ComfyUI names without prefix, fused qkv. Types as
  ComfyUI-GGUF's tools give them: `tools/convert.py` keeps 1-D and <= 1024-value tensors F32
  and the rest BF16 (the source is bf16); its llama.cpp patch then quantizes only the 2-D
  tensors outside t_embedder, x_embedder, final_layer, cap_embedder and the two refiners,
  falling back to F16 where the rows do not fill the type's blocks. Here `layers.0` is Q8_0
  and `layers.1` Q4_0 (a mixed file, as the `_M` variants are); `feed_forward.w2` (rows of
  85) falls back to F16.
- `comfy_gguf_dequantized.safetensors`: the tensors of that GGUF that differ from the source
  (the quantized and the F16 ones) dequantized by the `gguf` package to f32 (what ComfyUI-GGUF
  computes with), same names; with the source's other tensors, the dense reference.
- `comfy_fp8.safetensors`: a ComfyUI "scaled fp8" checkpoint: every block Linear weight as
  float8_e4m3fn with a per-tensor f32 `scale_weight` (absmax / 448), except
  `layers.1.feed_forward.w2.weight`, stored fp8 without a scale (ComfyUI reads it with
  scale 1); `layers.0.*` also carry a `scale_input` (used only by ComfyUI's fp8 matmul); the
  `scaled_fp8` marker tensor; the rest bf16.
- `comfy_fp8_dequantized.safetensors`: its fp8 weights as ComfyUI dequantizes them without
  fp8 matmul, `weight.float() * scale_weight`, in f32 (the other tensors are the source's).
- `text_encoder_fp8.safetensors`: the fixture's Qwen3 text encoder as ComfyUI's scaled fp8
  text encoders store it: every 2-D weight of its layers float8_e4m3fn with a per-tensor
  `scale_weight`, the embedding and norms f32.
- `text_encoder_fp8_dequantized.safetensors`: the same encoder with those weights as
  `weight.float() * scale_weight` (all tensors, f32).
- `unknown_type.gguf`: a `lumina2` GGUF with one IQ4_NL tensor (a type candle cannot read).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "fixtures/tiny/comfy_transformer.safetensors"
TEXT_ENCODER = ROOT / "fixtures/tiny/model/text_encoder/model.safetensors"
OUT = ROOT / "fixtures/quantized"

PREFIX = "model.diffusion_model."
ARCH = "lumina2"
Q = gguf.GGMLQuantizationType
# ComfyUI-GGUF's llama.cpp patch: tensors of these never get quantized for lumina2.
NOT_QUANTIZED = ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner.")
BLOCKS = ("layers.", "context_refiner.", "noise_refiner.")


def converter_type(t: torch.Tensor) -> gguf.GGMLQuantizationType:
    """tools/convert.py's choice for a bf16 source tensor."""
    if t.dim() == 1 or t.numel() <= 1024:
        return Q.F32
    return Q.BF16


def quantizer_type(name: str, t: torch.Tensor, base: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The llama.cpp patch's choice: layer 0 Q8_0, layer 1 Q4_0, F16 where blocks do not fit."""
    if t.dim() != 2 or any(name.startswith(p) for p in NOT_QUANTIZED) or not name.startswith("layers."):
        return base
    target = Q.Q8_0 if name.startswith("layers.0.") else Q.Q4_0
    block, _ = gguf.GGML_QUANT_SIZES[target]
    return target if t.shape[1] % block == 0 else Q.F16


def write_gguf(source: dict[str, torch.Tensor]) -> None:
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    dense = {}
    for name, t in sorted(source.items()):
        qtype = quantizer_type(name, t, converter_type(t))
        data = gguf.quants.quantize(t.float().numpy(), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        if qtype not in (Q.F32, Q.BF16):
            back = gguf.quants.dequantize(data, qtype).reshape(t.shape)
            dense[name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    writer.write_header_to_file(path=OUT / "comfy_gguf.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(dense, str(OUT / "comfy_gguf_dequantized.safetensors"))


def is_block_linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith(".weight") and name.startswith(BLOCKS)


def write_fp8(source: dict[str, torch.Tensor]) -> None:
    fp8, dense = {}, {}
    for name, t in sorted(source.items()):
        if not is_block_linear(name, t):
            fp8[name] = t
            continue
        stem = name.removesuffix(".weight")
        if name == "layers.1.feed_forward.w2.weight":
            codes = t.float().to(torch.float8_e4m3fn)
            scale = torch.tensor(1.0)
        else:
            codes, scale = scaled_fp8(t)
            fp8[f"{stem}.scale_weight"] = scale
        if name.startswith("layers.0."):
            fp8[f"{stem}.scale_input"] = torch.tensor(1.0, dtype=torch.float32)
        fp8[name] = codes
        dense[name] = codes.to(torch.float32) * scale
    fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({PREFIX + k: v for k, v in fp8.items()}, str(OUT / "comfy_fp8.safetensors"))
    save_file({PREFIX + k: v for k, v in dense.items()}, str(OUT / "comfy_fp8_dequantized.safetensors"))


def scaled_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and the per-tensor f32 scale that maps the largest magnitude to 448."""
    scale = (t.float().abs().max() / 448.0).to(torch.float32)
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def write_fp8_text_encoder() -> None:
    fp8, dense = {}, {}
    for name, t in sorted(load_file(str(TEXT_ENCODER)).items()):
        if t.dim() == 2 and name.startswith("layers."):
            codes, scale = scaled_fp8(t)
            fp8[name] = codes
            fp8[name.removesuffix(".weight") + ".scale_weight"] = scale
            dense[name] = codes.to(torch.float32) * scale
        else:
            fp8[name] = t
            dense[name] = t.float()
    save_file(fp8, str(OUT / "text_encoder_fp8.safetensors"))
    save_file(dense, str(OUT / "text_encoder_fp8_dequantized.safetensors"))


def write_unknown_type() -> None:
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    raw = np.zeros((32, 32 // block * size), dtype=np.uint8)
    writer.add_tensor("layers.0.attention.out.weight", raw, raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file(path=OUT / "unknown_type.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # ComfyUI-GGUF's converter strips ComfyUI's prefix; ComfyUI's own fp8 files keep it.
    source = {k.removeprefix(PREFIX): v for k, v in load_file(str(SOURCE)).items()}
    write_gguf(source)
    write_fp8(source)
    write_fp8_text_encoder()
    write_unknown_type()
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
