"""CPU benchmarks of the framework (see benchmarks/README.md); `make bench` runs them all.

The CPU-mode environment is set here, before any script imports torch, DeepSpeed or vLLM, so each
script also runs alone (`python -m benchmarks.<name>`) without sourcing scripts/env.sh.
"""

import os
from pathlib import Path

for _key, _value in {
    "DS_ACCELERATOR": "cpu",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RLHF_CACHE": str(Path.home() / ".cache" / "rlhf"),
}.items():
    os.environ.setdefault(_key, _value)
