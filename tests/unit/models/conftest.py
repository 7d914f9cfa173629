"""Fixtures for model tests: the cached tiny world (qwen2 checkpoints built on first use)."""

import pytest
from transformers import AutoTokenizer

from rlhf.data.tiny_world import TinyWorldPaths, tiny_world_dir


@pytest.fixture(scope="session")
def tiny_paths() -> TinyWorldPaths:
    return tiny_world_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_paths):
    return AutoTokenizer.from_pretrained(tiny_paths.tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_paths) -> TinyWorldPaths:
    """The tiny world with qwen2 policy-init and policy-sft (about 15 s of warm-up the first time)."""
    from rlhf.models.warmup import tiny_world_models

    return tiny_world_models(archs=("qwen2",))
