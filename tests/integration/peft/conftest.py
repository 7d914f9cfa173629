"""PEFT integration tests: the session's Ray cluster, a random tiny qwen2 checkpoint, random rollout batches."""

from __future__ import annotations

import pytest
import torch

from rlhf.data.batch import RolloutBatch

VOCAB = 64


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random tiny qwen2 causal LM (vocab 64, hidden 128, 2 layers), as a plain HF checkpoint."""
    from rlhf.models.tiny import build_tiny_model, save_tiny_model

    return str(
        save_tiny_model(build_tiny_model("qwen2", vocab_size=VOCAB, seed=0), None, tmp_path_factory.mktemp("tiny"))
    )


@pytest.fixture(scope="session")
def batch_factory():
    """`make_batch(rows=8, prompt_len=5, response_len=6, seed=0)` (a fixture: this folder is no package,
    so that its name does not shadow the peft library)."""
    return make_batch


def make_batch(rows: int = 8, prompt_len: int = 5, response_len: int = 6, seed: int = 0) -> RolloutBatch:
    """Random tokens, left-padded prompts of 3-5 tokens, right-padded responses of 3-6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, VOCAB, (rows, prompt_len), generator=gen)
    response_ids = torch.randint(1, VOCAB, (rows, response_len), generator=gen)
    prompt_mask = torch.ones(rows, prompt_len, dtype=torch.long)
    response_mask = torch.ones(rows, response_len, dtype=torch.long)
    for i in range(rows):
        prompt_mask[i, : i % 3] = 0
        prompt_ids[i, : i % 3] = 0
        response_mask[i, response_len - i % 4 :] = 0
        response_ids[i, response_len - i % 4 :] = 0
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask
    )
