#!/usr/bin/env python
"""Reads a GGUF with the `gguf` package (llama.cpp's reader, the one ComfyUI-GGUF uses),
dequantizes every tensor to f32 as ComfyUI-GGUF does before computing with it, and writes
them under their GGUF names to a safetensors file. Prints a JSON summary on stdout:
`{"architecture": ..., "file_type": ..., "tensors": {name: [type, [torch-order shape]]}}`.

    /work/venv/bin/python scripts/gguf_dequantize.py IN.gguf OUT.safetensors

Used by zlora's tests of `zlora quantize` (crates/zlora-cli/tests/quantized_files.rs).
"""

import json
import sys

import gguf
import numpy as np
from safetensors.numpy import save_file


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    value = f.parts[f.data[-1]]
    return str(value, encoding="utf-8") if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])


def main(src: str, dst: str) -> None:
    reader = gguf.GGUFReader(src)
    dense, summary = {}, {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; torch order is the reverse (ComfyUI-GGUF).
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        dense[t.name] = np.ascontiguousarray(values, dtype=np.float32)
        summary[t.name] = [t.tensor_type.name, shape]
    save_file(dense, dst)
    out = {
        "architecture": field(reader, "general.architecture"),
        "file_type": field(reader, "general.file_type"),
        "tensors": summary,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
