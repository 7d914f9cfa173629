# Sourced by the GPU checks: installs the carried wheels into /tmp/site (the lent machine has torch and
# transformers for CUDA but no network). Expects wheels for ray, hydra-core, omegaconf, ... in .whl/
# (`pip download --only-binary=:all: --no-deps -d .whl <packages>` for the device's Python), the
# deepspeed sdist beside them, and the tiny-world cache in .cache/rlhf; logs to $OUT/install.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site .whl/deepspeed-*.tar.gz > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RLHF_CACHE=$PWD/.cache/rlhf
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
