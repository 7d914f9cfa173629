"""Tiny causal LMs built from a config (random init) for tests, the demo and benchmarks.

Both families are ones vLLM serves. Sizes respect vLLM's CPU attention kernels, which accept
head_dim in {32, 64, 80, 96, 112, 128, ...}: hidden 128 with 4 heads gives head_dim 32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PretrainedConfig, Qwen2Config

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


SCRIPTED_LOGIT = 200.0
"""Logit of a scripted next token (every other token: 0). exp(-200) underflows to 0 in float32, so at any
temperature <= 1 an unscripted token has probability exactly 0, and two scripted successors exactly 1/2 each."""


def build_scripted_model(
    tokenizer, script: Mapping[str, str | Sequence[str]], *, arch: str = "qwen2", hidden_size: int = 128
) -> torch.nn.Module:
    """A tiny causal LM whose next token depends only on the current token, as `script` says: a bigram automaton.

    For tests that must force what a model writes by construction instead of hoping a trained model
    samples it. `script` maps a token's text to the text of its successor (sampled with probability 1)
    or to several successors (equally likely). Each text must be exactly one token of `tokenizer`.

    Construction: every attention output and MLP output projection is zero, so the residual stream at
    a position is the embedding of the token there; a scripted token's embedding is a one-hot vector
    (one dimension per key of `script`, hence at most `hidden_size` keys); the final RMSNorm scales it
    to sqrt(hidden_size), and the LM head maps that dimension to SCRIPTED_LOGIT on the successors. A
    token that is not a key has a zero embedding, hence all-zero logits: a uniform next token.
    The model is an ordinary Hugging Face checkpoint (save it with `save_tiny_model`); the rollout
    engines serve it like any other.
    """
    if len(script) > hidden_size:
        raise ValueError(
            f"a scripted model of hidden size {hidden_size} holds at most {hidden_size} tokens, got {len(script)}"
        )

    def token_id(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens of the tokenizer; a script names single tokens")
        return ids[0]

    model = build_tiny_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_layers=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for dim, (current, successors) in enumerate(script.items()):
            embeddings[token_id(current), dim] = 1.0
            for successor in [successors] if isinstance(successors, str) else successors:
                head[token_id(successor), dim] = SCRIPTED_LOGIT / hidden_size**0.5
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model
