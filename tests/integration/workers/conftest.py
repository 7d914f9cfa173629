"""Worker tests share the session's real Ray cluster (tests/conftest.py), tiny checkpoints, batch builders.

tests/conftest.py sets the environment before Ray starts (no token auth, DeepSpeed on CPU over gloo,
its JIT cache outside the repo: 35 s cold build of the shm op, then 0.4 s).
"""

from __future__ import annotations

import pytest
import torch

from rlhf.data.batch import RolloutBatch

VOCAB = 64


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The session's Ray cluster: ray.init(num_cpus=8, include_dashboard=False, _temp_dir=<tmp>)."""
    yield ray_cluster


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random tiny qwen2 causal LM (vocab 64, hidden 128, 2 layers), as a plain HF checkpoint."""
    from rlhf.models.tiny import build_tiny_model, save_tiny_model

    model = build_tiny_model("qwen2", vocab_size=VOCAB, seed=0)
    return str(save_tiny_model(model, None, tmp_path_factory.mktemp("tiny-policy")))


@pytest.fixture(scope="session")
def batch_factory():
    """`make_batch(rows=8, prompt_len=5, response_len=6, seed=0)` (a fixture, so test modules need no import)."""
    return make_batch


def make_batch(rows: int = 8, prompt_len: int = 5, response_len: int = 6, seed: int = 0) -> RolloutBatch:
    """Random tokens with left-padded prompts and right-padded responses of varying length."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, VOCAB, (rows, prompt_len), generator=gen)
    response_ids = torch.randint(1, VOCAB, (rows, response_len), generator=gen)
    prompt_mask = torch.ones(rows, prompt_len, dtype=torch.long)
    response_mask = torch.ones(rows, response_len, dtype=torch.long)
    for i in range(rows):
        pad = i % 3  # prompts of length prompt_len, -1, -2
        prompt_mask[i, :pad] = 0
        prompt_ids[i, :pad] = 0
        cut = response_len - i % 4  # responses of length response_len, -1, -2, -3
        response_mask[i, cut:] = 0
        response_ids[i, cut:] = 0
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask
    )
