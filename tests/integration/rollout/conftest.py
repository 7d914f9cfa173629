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


CUT_MARGIN = 1e-4
"""A position whose top-k or top-p cut lies closer than this (logit gap, probability mass) to another
token is left out of a truncated-distribution comparison: float32 rounding may cut it either way."""


def sample_batch(prompts, outputs, pad_id):
    """(RolloutBatch of every prompt + generation, the engine's logprobs [rows, R]), right-padded with 0."""
    import torch

    from rlhf.data.batch import RolloutBatch, pad_sequences

    rows = [(p, g) for p, gens in zip(prompts, outputs) for g in gens]
    prompt_ids, prompt_mask = pad_sequences([p for p, _ in rows], pad_id=pad_id, left=True)
    response_ids, response_mask = pad_sequences([g.token_ids for _, g in rows], pad_id=pad_id, left=False)
    engine, _ = pad_sequences([g.logprobs for _, g in rows], pad_id=0, left=False, dtype=torch.float32)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask), engine


def sampled_distribution_logprobs(model, prompts, outputs, pad_id, sampling):
    """(engine, expected, compared): [rows, R] logprobs of every sampled response token as the engine
    reported them and as the sampling distribution gives them, from one float32 forward of prompt +
    response with temperature, top-k and top-p applied by hand (vLLM's order and rules), and the
    response positions to compare (real tokens whose cut is not within CUT_MARGIN of flipping)."""
    import torch

    from rlhf.engines.rollout import logprob_temperature
    from rlhf.models.logprobs import response_logits

    batch, engine = sample_batch(prompts, outputs, pad_id)
    response_ids, response_mask = batch.response_ids, batch.response_mask
    with torch.no_grad():
        device = next(model.parameters()).device
        logits = response_logits(model, batch.to(device), temperature=logprob_temperature(sampling)).cpu()
    kept = torch.ones_like(logits, dtype=torch.bool)
    unsure = torch.zeros(logits.shape[:2], dtype=torch.bool)
    if sampling.temperature > 0 and sampling.top_k > 0:
        top = logits.topk(sampling.top_k + 1, dim=-1).values
        kept &= logits >= top[..., -2:-1]
        unsure |= top[..., -2] - top[..., -1] < CUT_MARGIN
    if sampling.temperature > 0 and sampling.top_p < 1:
        probs, order = logits.masked_fill(~kept, float("-inf")).softmax(-1).sort(dim=-1)
        mass_below = probs.cumsum(-1)
        drop = mass_below <= 1 - sampling.top_p
        drop[..., -1] = False
        kept &= ~drop.scatter(-1, order, drop)
        unsure |= (mass_below - (1 - sampling.top_p)).abs().amin(-1) < CUT_MARGIN
    logprobs = logits.masked_fill(~kept, float("-inf")).log_softmax(-1)
    expected = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    compared = response_mask.bool() & ~unsure
    return engine, torch.where(compared, expected, torch.zeros(())), compared
