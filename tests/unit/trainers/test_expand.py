"""generate.expand's judging of one continuation (rlhf.trainers.expand.judge) with the real tiny tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rlhf.config import RLHFConfig
from rlhf.data.expansion import DedupPool
from rlhf.data.tiny_world import tiny_world_dir
from rlhf.trainers.expand import ExpansionJob, judge, kept_row
from rlhf.trainers.generate import PromptSet

OVERHEAD = 6
"""The tiny chat template around a user prompt: <|bos|><|user|>\\n ... <|end|><|assistant|>\\n, one token per
special token and per character (the tiny tokenizer is character level)."""


@pytest.fixture(scope="module")
def job():
    tokenizer = AutoTokenizer.from_pretrained(tiny_world_dir().tokenizer_dir)
    cfg = RLHFConfig(stage="generate")
    cfg.data.max_prompt_length = 16
    seeds = PromptSet([[{"role": "user", "content": "copy ab cd"}]], [], [], [{}])
    return ExpansionJob(cfg, tokenizer, seeds, ["copy ab cd"], store=None, summary={})  # type: ignore[arg-type]


@pytest.fixture
def pool():
    pool = DedupPool(threshold=0.7)
    pool.add("copy ab cd")
    return pool


def test_prompt_tokens_are_counted_as_a_chat_prompt(job, pool):
    assert judge(job, pool, "xy", "stop")["prompt_tokens"] == 2 + OVERHEAD


def test_judge_accepts_filters_and_dedups(job, pool):
    accepted = judge(job, pool, "xy zw\nTask 3: more", "length")
    assert accepted["reason"] == "accepted" and accepted["instruction"] == "xy zw"
    assert (accepted["similarity"], accepted["closest"]) == (0.0, None)
    # [ab, cd] vs [copy, ab, cd]: LCS 2, P = 1, R = 2/3, F = 0.8 > 0.7
    near = judge(job, pool, "ab cd", "stop")
    assert near["reason"] == "near_duplicate" and near["similarity"] == pytest.approx(0.8)
    assert near["closest"] == "copy ab cd" and near["prompt_tokens"] == 5 + OVERHEAD
    exact = judge(job, pool, "COPY ab-cd", "stop")
    assert (exact["reason"], exact["similarity"], exact["closest"]) == ("exact_duplicate", 1.0, "copy ab cd")
    # 11 characters + 6 = 17 tokens > data.max_prompt_length 16; checked before dedup
    long = judge(job, pool, "copy abcdef", "stop")
    assert long["reason"] == "too_long" and long["prompt_tokens"] == 17 and long["similarity"] is None
    # 16 tokens fit; [copy, abcde] vs [copy, ab, cd]: LCS 1, F = 2 × (1/2 × 1/3) / (1/2 + 1/3) = 0.4
    fits = judge(job, pool, "copy abcde", "stop")
    assert fits["reason"] == "accepted" and fits["prompt_tokens"] == 16 and fits["similarity"] == pytest.approx(0.4)
    assert judge(job, pool, " !? ", "stop")["reason"] == "empty"
    assert judge(job, pool, "abcabcabc", "length")["reason"] == "unparseable"


def test_kept_row_takes_the_shape_of_the_seed_prompts(job, pool):
    judged = judge(job, pool, "xy", "stop")
    row = kept_row(job, 3, 17, [0], judged)
    assert row == {
        "expansion_index": 3,
        "prompt": [{"role": "user", "content": "xy"}],
        "prompt_tokens": 8,
        "attempt": 17,
        "seed_indices": [0],
        "similarity": 0.0,
        "closest": None,
    }
