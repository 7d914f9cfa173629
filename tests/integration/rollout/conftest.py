"""Rollout test set-up: vLLM caches in a temp dir, one tiny checkpoint (model + tokenizer) per session."""

from __future__ import annotations

import os
import tempfile

import pytest

# Set at collection, before the session's Ray cluster starts, so every engine actor inherits them.
_VLLM_TMP = tempfile.mkdtemp(prefix="rlhf-vllm-")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(_VLLM_TMP, "cache"))
os.environ.setdefault("VLLM_RPC_BASE_PATH", os.path.join(_VLLM_TMP, "rpc"))

TINY_CORPUS = [
    f"{a} + {b} = {a + b}. reverse {w} -> {w[::-1]}"
    for a in range(20)
    for b in range(5)
    for w in ("abc", "hello", "rlhf")
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A random tiny qwen2 (head_dim 32, as vLLM's CPU attention needs) with a BPE tokenizer."""
    from rlhf.data.tokenizer import train_tiny_tokenizer
    from rlhf.models.tiny import build_tiny_model, save_tiny_model

    tokenizer = train_tiny_tokenizer(TINY_CORPUS, vocab_size=300)
    model = build_tiny_model(
        "qwen2",
        vocab_size=len(tokenizer),
        seed=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return str(save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("tiny-qwen2")))
