#!/usr/bin/env bash
# Regenerate requirements/cpu.lock from a working .venv (after changing a dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip freeze --all \
    | grep -viE '^(#|torch==|torchvision|torchaudio|torchcodec|-e |rlhf)' > requirements/cpu.lock
echo "wrote requirements/cpu.lock ($(wc -l < requirements/cpu.lock) packages)"
