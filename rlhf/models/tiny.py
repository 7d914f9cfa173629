"""Tiny causal LMs built from a config (random init) for tests, the demo and benchmarks.

Both families are ones vLLM serves. Sizes respect vLLM's CPU attention kernels, which accept
head_dim in {32, 64, 80, 96, 112, 128, ...}: hidden 128 with 4 heads gives head_dim 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from rlhf.errors import ConfigError

TINY_ARCHITECTURES = ("llama", "qwen2")


def tiny_config(
    arch: str = "qwen2",
    *,
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 512,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """A config for a tiny model of `arch` ("llama" or "qwen2")."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ConfigError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHITECTURES)}")


def build_tiny_model(arch: str = "qwen2", *, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM (float32), deterministic for a seed."""
    config = tiny_config(arch, vocab_size=vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def save_tiny_model(model: torch.nn.Module, tokenizer, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer as a normal Hugging Face checkpoint directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
