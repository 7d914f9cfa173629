#!/usr/bin/env bash
# One prepared check for a lent GPU machine: GRPO and PPO on the tiny world with cluster=single_gpu
# (every role on one GPU, bf16, HF rollout backend: vLLM for CUDA is too large to carry there).
# Expects wheels for ray/hydra/... in .whl/, the deepspeed sdist beside them, and the tiny-world
# cache in .cache/rlhf (both carried); writes logs and metrics to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site .whl/deepspeed-*.tar.gz > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RLHF_CACHE=$PWD/.cache/rlhf
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
for stage in grpo ppo; do
    start=$(date +%s)
    timeout 105 python3 -m rlhf stage=$stage cluster=single_gpu rollout.backend=hf run.total_steps=10 \
        run.eval_every=0 run.eval_size=64 run.progress_bar=false run.tensorboard=false \
        run.output_dir=/tmp/out_$stage > "$OUT/$stage.log" 2>&1
    echo "$stage rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"
    cp /tmp/out_$stage/metrics.jsonl "$OUT/${stage}_metrics.jsonl" 2>/dev/null
    tail -5 "$OUT/$stage.log"
done
cat "$OUT/summary.txt"
