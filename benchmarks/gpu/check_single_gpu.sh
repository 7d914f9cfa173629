#!/usr/bin/env bash
# One prepared check for a lent GPU machine: GRPO and PPO on the tiny world with cluster=single_gpu
# (every role on one GPU, bf16, HF rollout backend: vLLM for CUDA is too large to carry there).
# Expects wheels for ray/hydra/... in .whl/, the deepspeed sdist beside them, and the tiny-world
# cache in .cache/rlhf (both carried); writes logs and metrics to $OUT.
set -u
source "$(dirname "$0")/install.sh"
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
