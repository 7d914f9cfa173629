"""rlhf: distributed post-training for large language models (Ray + DeepSpeed + vLLM)."""

__version__ = "0.1.0"
