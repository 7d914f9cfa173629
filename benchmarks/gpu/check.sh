#!/usr/bin/env bash
# The prepared GPU check (issue 18, item 6): benchmarks/gpu_check.py on one lent H100/H200, in under
# 8 minutes: GRPO and PPO steps of a ~0.5B Qwen2-shaped model built from a config (random init, the
# tiny world's tokenizer), bf16, ZeRO-3 inside zero.Init, HF rollout backend; update MFU, generation
# tokens/s and peak GPU memory per role. Carry .whl/ and .cache/rlhf as for check_single_gpu.sh.
# Brings back in $OUT: the logs, gpu_check.json and benchmarks/README.md with the table filled in
# (copy both into the repo: benchmarks/results/gpu_check.json, benchmarks/README.md).
set -u
source "$(dirname "$0")/install.sh"
timeout 420 python3 -m benchmarks.gpu_check --device cuda --steps 5
rc=$?
cp benchmarks/results/gpu_check.json benchmarks/README.md "$OUT/" 2>/dev/null
exit $rc
