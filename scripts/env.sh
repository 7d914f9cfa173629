# Environment for CPU mode, tests and CI (sourced by the Makefile). See ../shared STACK notes in docs.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export RLHF_CACHE=${RLHF_CACHE:-$HOME/.cache/rlhf}
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
