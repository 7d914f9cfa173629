"""RewardPipeline on real Ray: a reward model (batch-whitened) and an LLM judge (tiny model, hf engine)
next to a rule reward, started the way RLTrainer starts them.

The tiny judge rarely writes a parseable verdict; what is checked is the plumbing: the rubric is
rendered and generated on the engine, every verdict is parsed with the configured regex, the
unparseable ones are counted and scored `unparseable_score`, and reward/mean is the weighted sum
of the terms' means.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.config import RLHFConfig
from rlhf.data.batch import RolloutBatch, pad_sequences
from rlhf.models.loading import load_tokenizer, resolve_model_path
from rlhf.models.tiny import tiny_config
from rlhf.rewards import build_reward_pipeline
from rlhf.rewards.judge import parse_pointwise
from rlhf.trainers.roles import start_group

pytestmark = pytest.mark.ray

PROMPTS = ["3+4=", "2+2=", "9-5=", "1+1="]
RESPONSES = ["7", "5", "4", "two"]
ANSWERS = ["7", "4", "4", "2"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny"))


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory, tokenizer) -> str:
    config = tiny_config("qwen2", vocab_size=len(tokenizer))
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-rm")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return str(path)


def make_batch(tokenizer) -> RolloutBatch:
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    responses = [tokenizer(r, add_special_tokens=False).input_ids for r in RESPONSES]
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id=tokenizer.pad_token_id, left=True)
    response_ids, response_mask = pad_sequences(responses, pad_id=tokenizer.pad_token_id, left=False)
    metadata = [{"answer": a, "prompt_text": p} for p, a in zip(PROMPTS, ANSWERS)]
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, metadata=metadata)


def test_rule_model_and_judge_terms_together(ray_cluster, tokenizer, reward_model_path, engine_calls):
    """With rollout.enable_sleep (a judge sharing the trainer's GPU) the judge's engine sleeps after each
    batch of verdicts and wakes whole before the next (no weight sync: its weights never change)."""
    cfg = RLHFConfig()
    cfg.rollout.enable_sleep = True
    cfg.policy.micro_batch_size = 2
    cfg.reward.model_path = reward_model_path
    cfg.reward.model_weight = 0.5
    cfg.reward.model_norm.mode = "batch"
    judge = cfg.reward.judge
    judge.model_path, judge.backend, judge.weight, judge.max_new_tokens = "tiny", "hf", 2.0, 6
    judge.template = "Grade 0-99. Question: {prompt} Answer: {response} Reference: {reference} Grade:"
    judge.pattern, judge.score_min, judge.score_max = r"(\d+)", 0.0, 99.0
    judge.unparseable_score = 0.25
    pipeline = build_reward_pipeline(cfg, tokenizer)
    assert [t.name for t in pipeline.terms] == ["tiny_world", "model", "judge"]
    try:
        pipeline.start(lambda *args, **kwargs: start_group(cfg.cluster, *args, **kwargs))
        judge_engines = pipeline.terms[2].judge.engines.group
        engine_calls.record(judge_engines)
        batch = make_batch(tokenizer)
        scores, stats = pipeline.score(batch)

        # the judge, by hand, on the same engine: greedy, so the verdicts repeat exactly
        judge_term = pipeline.terms[2]
        inputs = pipeline.inputs(batch)
        assert inputs.plain_prompts == PROMPTS
        _, unparseable, verdicts = judge_term.judge.collect(
            judge_term.judge.score_async(inputs.plain_prompts, inputs.responses, inputs.metadata)
        )
        parsed = [parse_pointwise(v, judge_term.judge.pattern, 0.0, 99.0) for v in verdicts]
        judge_scores = torch.tensor([0.25 if p is None else p for p in parsed])
        assert stats["reward/judge_unparseable"] == float(sum(p is None for p in parsed)) == unparseable
        torch.testing.assert_close(stats["reward/judge_mean"], judge_scores.mean())
        assert engine_calls.take(judge_engines) == [["generate", "sleep", "wake:weights+kv_cache", "generate", "sleep"]]
    finally:
        pipeline.close()

    assert stats["reward/tiny_world_mean"] == 0.5  # rows 0 and 2 are right
    assert abs(float(stats["reward/model_mean"])) < 1e-5  # batch-whitened
    assert float(stats["reward/model_raw_mean"]) != 0.0
    expected = stats["reward/tiny_world_mean"] + 0.5 * stats["reward/model_mean"] + 2.0 * stats["reward/judge_mean"]
    assert float(stats["reward/mean"]) == pytest.approx(float(expected), abs=1e-5)
    assert scores.shape == (4,)
