"""RewardPipeline on real Ray: a reward model (batch-whitened) and an LLM judge (tiny model, hf engine)
next to a rule reward, started the way RLTrainer starts them; and a reward model with its own tokenizer.

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
from rlhf.data.prompts import PromptExample, prompt_metadata
from rlhf.data.tokenizer import as_messages, encode_chat_prompt
from rlhf.models.loading import load_tokenizer, resolve_model_path
from rlhf.models.logprobs import last_token_scores
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


def save_reward_model(path, tokenizer, *, seed: int, with_tokenizer: bool) -> str:
    """A random tiny reward model for `tokenizer`'s ids (saved with the tokenizer, or without one)."""
    config = tiny_config("qwen2", vocab_size=len(tokenizer))
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory, tokenizer) -> str:
    return save_reward_model(tmp_path_factory.mktemp("tiny-rm"), tokenizer, seed=0, with_tokenizer=False)


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


# (prompt as the dataset wrote it, response text, whether the policy finished it with eos)
CONVERSATIONS = [
    ("3+4=", "7", True),
    ([{"role": "system", "content": "Answer with digits."}, {"role": "user", "content": "2+2="}], "4", True),
    ("reverse abc", "cb", False),  # cut off by max_new_tokens
    ("copy xyz", "xyz", True),
]


@pytest.fixture(scope="module")
def other_reward_model_path(tmp_path_factory, other_tokenizer_dir) -> str:
    """A random tiny reward model saved with a tokenizer of reversed ids and another chat template."""
    path = tmp_path_factory.mktemp("tiny-rm-other-tokenizer")
    return save_reward_model(path, load_tokenizer(other_tokenizer_dir), seed=1, with_tokenizer=True)


def policy_batch(tokenizer) -> RolloutBatch:
    """CONVERSATIONS as the policy's rollout holds them: its chat template, its ids, eos when finished."""
    prompts = [encode_chat_prompt(tokenizer, prompt) for prompt, _, _ in CONVERSATIONS]
    responses = [
        tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] * finished
        for _, text, finished in CONVERSATIONS
    ]
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id=tokenizer.pad_token_id, left=True)
    response_ids, response_mask = pad_sequences(responses, pad_id=tokenizer.pad_token_id, left=False)
    metadata = [prompt_metadata(PromptExample(prompt)) for prompt, _, _ in CONVERSATIONS]
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, metadata=metadata)


def test_reward_model_with_another_tokenizer_scores_the_text_in_its_own_encoding(
    ray_cluster, tokenizer, other_reward_model_path
):
    cfg = RLHFConfig()
    cfg.reward.fn, cfg.reward.model_path, cfg.policy.micro_batch_size = None, other_reward_model_path, 2
    pipeline = build_reward_pipeline(cfg, tokenizer)
    assert pipeline.terms[0].own_tokenizer is not None  # the tokenizers were compared at build time
    batch = policy_batch(tokenizer)
    try:
        pipeline.start(lambda *args, **kwargs: start_group(cfg.cluster, *args, **kwargs))
        scores, _ = pipeline.score(batch)
    finally:
        pipeline.close()

    # the same conversations written with the reward model's own chat template and tokenizer, scored here
    other = load_tokenizer(other_reward_model_path)
    rows = [
        other(
            other.apply_chat_template([*as_messages(prompt), {"role": "assistant", "content": text}], tokenize=False),
            add_special_tokens=False,
        ).input_ids
        for prompt, text, _ in CONVERSATIONS
    ]
    ids, mask = pad_sequences(rows, pad_id=other.pad_token_id, left=False)
    model = AutoModelForSequenceClassification.from_pretrained(other_reward_model_path).eval()
    with torch.no_grad():
        direct = last_token_scores(model, RolloutBatch(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:]))
        policy_ids = last_token_scores(model, batch)  # what the reward model scored before re-encoding
    torch.testing.assert_close(scores, direct, rtol=0, atol=1e-5)
    assert (policy_ids - direct).abs().max() > 1e-3  # the policy's ids mean other tokens to this model
