"""The async rollout buffer's pure parts: one step's requests merged into one batch, and a one_step_off checkpoint's
batch read as the buffer's state (the scheduling runs against real engines in tests/integration/async_rl)."""

from __future__ import annotations

import pytest
import torch

from rlhf.data.stream import PromptBatch
from rlhf.trainers.rl import build_rollout_batch
from rlhf.trainers.rollout_buffer import GeneratedBatch, buffer_state, merge_generated


class Gen:
    def __init__(self, token_ids, finish_reason="stop"):
        self.token_ids, self.logprobs, self.finish_reason = token_ids, [-0.5] * len(token_ids), finish_reason


def request(step, texts, responses, version, *, started, seconds, truncated):
    prompts = PromptBatch([[1, 2]] * len(texts), texts, [{"id": t} for t in texts])
    outputs = [[Gen(r) for r in per_prompt] for per_prompt in responses]
    batch = build_rollout_batch(prompts, outputs, pad_id=0)
    batch = batch.replace(versions=torch.full((len(batch),), version))
    stats = {"rollout/truncated_frac": torch.tensor(truncated)}
    return GeneratedBatch(step, prompts, batch, stats, seconds, started)


def test_requests_merge_in_prompt_order_with_group_ids_over_the_step():
    first = request(3, ["a"], [[[5], [5, 6]]], 1, started=10.0, seconds=2.0, truncated=0.5)
    second = request(3, ["b", "c"], [[[7, 7, 7], [7]], [[8], [8]]], 2, started=10.5, seconds=4.0, truncated=0.0)
    merged = merge_generated(3, [first, second])
    assert merged.step == 3 and merged.prompts.texts == ["a", "b", "c"]
    assert merged.batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert merged.batch.versions.tolist() == [1, 1, 2, 2, 2, 2]
    assert [m["prompt_text"] for m in merged.batch.metadata] == ["a", "a", "b", "b", "c", "c"]
    assert merged.batch.response_ids.shape == (6, 3)  # re-padded to the longest response of the step
    assert merged.stats["rollout/response_length"] == pytest.approx(9 / 6)  # lengths 1, 2, 3, 1, 1, 1
    assert merged.stats["rollout/response_length_max"] == 3
    assert float(merged.stats["rollout/truncated_frac"]) == pytest.approx(0.5 * 2 / 6)  # weighted by rows
    assert merged.stats["rollout/requests"] == 2.0
    assert merged.seconds == pytest.approx(4.5) and merged.started == 10.0  # first start to last answer


def test_requests_generated_before_a_resume_have_no_clock_here():
    first = request(0, ["a"], [[[5]]], 0, started=None, seconds=2.0, truncated=0.0)
    second = request(0, ["b"], [[[5]]], 0, started=None, seconds=3.0, truncated=0.0)
    assert merge_generated(0, [first, second]).seconds == 3.0
    alone = merge_generated(0, [first])
    assert alone.seconds == 2.0 and alone.stats["rollout/requests"] == 1.0


def test_a_one_step_off_batch_is_the_next_steps_only_request():
    ahead = request(4, ["a", "b"], [[[5]], [[6]]], 3, started=1.0, seconds=1.0, truncated=0.0)
    state = buffer_state(ahead)
    assert state["next_step"] == 5
    assert state["requests"] == [{"step": 4, "first_prompt": 0, "prompts": ahead.prompts, "generated": ahead}]
