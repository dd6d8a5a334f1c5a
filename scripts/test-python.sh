#!/usr/bin/env bash
# Makes (once) a Python virtualenv with the packages some tests read zlora's files with —
# TensorBoard's event reader, the `gguf` package (llama.cpp's reader), numpy and safetensors —
# and prints its python, for ZLORA_PYTHON:
#
#     export ZLORA_PYTHON=$(bash scripts/test-python.sh)
#
# Environment: ZLORA_TEST_VENV (default ~/.cache/zlora/test-python). Needs python3 with venv.
set -euo pipefail
venv=${ZLORA_TEST_VENV:-$HOME/.cache/zlora/test-python}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
if ! "$venv/bin/python" -c 'import tensorboard, gguf, numpy, safetensors' 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        tensorboard gguf numpy safetensors >&2
fi
echo "$venv/bin/python"
