"""Fixtures for data tests: the cached tiny world's data and tokenizer (built in about a second)."""

import pytest
from transformers import AutoTokenizer

from rlhf.data.tiny_world import TinyWorldPaths, tiny_world_dir


@pytest.fixture(scope="session")
def tiny_paths() -> TinyWorldPaths:
    return tiny_world_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_paths):
    return AutoTokenizer.from_pretrained(tiny_paths.tokenizer_dir)
