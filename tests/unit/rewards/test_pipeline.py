"""RewardPipeline without actors: building from config, weights, per-term metrics, start-up errors."""

from pathlib import Path

import pytest

from rlhf.config import RewardComponentConfig, RLHFConfig
from rlhf.data.batch import RolloutBatch, pad_sequences
from rlhf.errors import ConfigError, DataError, RLHFError
from rlhf.models.loading import load_tokenizer, resolve_model_path
from rlhf.rewards import build_reward_pipeline

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny"))


@pytest.fixture
def plugins(monkeypatch):
    """tests.fixtures.my_reward importable, as it is for a run started from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))


def make_batch(tokenizer, prompts, responses, answers, *, extra_tokens=()):
    """Responses encoded without special tokens; extra_tokens[i] pads response i to a longer token count."""
    prompt_rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    response_rows = [tokenizer(r, add_special_tokens=False).input_ids for r in responses]
    for i, k in enumerate(extra_tokens):
        response_rows[i] += [tokenizer.eos_token_id] * k  # special: dropped when decoding, counted as length
    prompt_ids, prompt_mask = pad_sequences(prompt_rows, pad_id=tokenizer.pad_token_id, left=True)
    response_ids, response_mask = pad_sequences(response_rows, pad_id=tokenizer.pad_token_id, left=False)
    metadata = [{"answer": a, "prompt_text": p} for p, a in zip(prompts, answers)]
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, metadata=metadata)
    return batch, [len(r) for r in response_rows]


def config(**reward) -> RLHFConfig:
    cfg = RLHFConfig()
    cfg.rollout.sampling.max_new_tokens = 8
    for key, value in reward.items():
        setattr(cfg.reward, key, value)
    return cfg


def test_default_is_the_rule_reward_alone(tokenizer):
    pipeline = build_reward_pipeline(config(), tokenizer)
    batch, _ = make_batch(tokenizer, ["3+4=", "2+2="], ["7", "5"], ["7", "4"])
    scores, stats = pipeline.score(batch)
    assert scores.tolist() == [1.0, 0.0]
    assert stats["reward/tiny_world_mean"] == 0.5 and stats["reward/mean"] == 0.5
    assert pipeline.primary_fn is pipeline.terms[0].fn


def test_weighted_components_with_the_overlong_penalty(tokenizer, plugins):
    cfg = config(
        fn="tests.fixtures.my_reward:score",
        weight=2.0,
        components=[RewardComponentConfig(fn="overlong_penalty", weight=0.5, kwargs={"buffer": 4})],
    )
    pipeline = build_reward_pipeline(cfg, tokenizer)
    batch, lengths = make_batch(tokenizer, ["3+4=", "2+2="], ["7", "5"], ["7", "4"], extra_tokens=(0, 6))
    # max_response_length comes from rollout.sampling.max_new_tokens = 8; free up to 8 - 4 = 4 tokens
    assert lengths[0] <= 4 and lengths[1] == lengths[0] + 6
    overlong = [0.0 if n <= 4 else (4 - n) / 4 for n in lengths]
    scores, stats = pipeline.score(batch)
    expected = [2.0 * 1.0 + 0.5 * overlong[0], 2.0 * 0.0 + 0.5 * overlong[1]]
    assert scores.tolist() == pytest.approx(expected)
    assert float(stats["reward/score_mean"]) == 0.5
    assert float(stats["reward/overlong_penalty_mean"]) == pytest.approx(sum(overlong) / 2)
    assert float(stats["reward/mean"]) == pytest.approx(sum(expected) / 2)


def test_custom_fn_sees_prompt_text_and_row_fields(tokenizer, plugins, monkeypatch):
    import tests.fixtures.my_reward as plugin

    seen = {}

    def spy(prompts, responses, metadata):
        seen.update(prompts=prompts, responses=responses, metadata=metadata)
        return [0.0] * len(responses)

    monkeypatch.setattr(plugin, "spy", spy, raising=False)
    pipeline = build_reward_pipeline(config(fn="tests.fixtures.my_reward:spy"), tokenizer)
    batch, lengths = make_batch(tokenizer, ["3+4="], ["7"], ["7"])
    pipeline.score(batch)
    assert seen["prompts"] == ["3+4="] and seen["responses"] == ["7"]
    assert seen["metadata"] == [{"answer": "7", "prompt_text": "3+4=", "response_length": lengths[0]}]


@pytest.mark.parametrize(
    "reward, match",
    [
        ({"fn": "tests.fixtures.my_reward:two_args"}, r"reward.fn: .*must take \(prompts, responses, metadata\)"),
        ({"fn": "tests.fixtures.my_reward:NOT_CALLABLE"}, r"reward.fn: .*is a int, not a function"),
        ({"fn": "tests.fixtures.nope:score"}, r"reward.fn: cannot import module 'tests.fixtures.nope'"),
        (
            {"components": [RewardComponentConfig(fn="overlong_penalty")]},
            r"reward.components\[0\]: .*'overlong_penalty' needs argument\(s\) buffer",
        ),
        (
            {"components": [RewardComponentConfig(fn="tiny_world")]},
            r"reward terms share the name\(s\) tiny_world; give reward.components\[i\].name distinct values",
        ),
        ({"fn": None}, r"no reward terms"),
    ],
)
def test_bad_reward_configs_fail_at_build(tokenizer, plugins, reward, match):
    with pytest.raises(ConfigError, match=match):
        build_reward_pipeline(config(**reward), tokenizer)


def test_remote_without_a_token_fails_at_build(tokenizer, monkeypatch):
    monkeypatch.delenv("RLHF_TEST_TOKEN", raising=False)
    cfg = config()
    cfg.reward.remote.url, cfg.reward.remote.token_env = "http://127.0.0.1:9", "RLHF_TEST_TOKEN"
    with pytest.raises(ConfigError, match="bearer token in the environment variable 'RLHF_TEST_TOKEN'"):
        build_reward_pipeline(cfg, tokenizer)


def test_bad_rewards_at_score_time(tokenizer, plugins, monkeypatch):
    import tests.fixtures.my_reward as plugin

    monkeypatch.setattr(plugin, "nan", lambda p, r, m: [float("nan")] * len(r), raising=False)
    pipeline = build_reward_pipeline(config(fn="tests.fixtures.my_reward:nan"), tokenizer)
    batch, _ = make_batch(tokenizer, ["3+4="], ["7"], ["7"])
    with pytest.raises(RLHFError, match="reward 'nan' returned non-finite rewards at rows \\[0\\]"):
        pipeline.score(batch)


def test_overlong_buffer_above_max_new_tokens_fails_when_the_pipeline_is_built():
    cfg = RLHFConfig()
    cfg.rollout.sampling.max_new_tokens = 4
    cfg.reward.components = [RewardComponentConfig(fn="overlong_penalty", kwargs={"buffer": 8})]
    with pytest.raises(ConfigError, match=r"reward.components\[0\].*buffer 8 must be in \(0, max_response_length 4\]"):
        build_reward_pipeline(cfg, tokenizer=None)


def save_reward_model(path, vocab_size: int, tokenizer=None) -> str:
    """A random tiny sequence-classification model, saved with `tokenizer` (or none)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.tiny import tiny_config

    config = tiny_config("qwen2", vocab_size=vocab_size)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_inputs_are_re_encoded_only_for_another_tokenizer(tokenizer, other_tokenizer_dir, tmp_path):
    same = save_reward_model(tmp_path / "same", len(tokenizer), tokenizer)
    other = save_reward_model(tmp_path / "other", len(tokenizer), load_tokenizer(other_tokenizer_dir))
    saved_without = save_reward_model(tmp_path / "without", len(tokenizer))
    own = [
        build_reward_pipeline(config(fn=None, model_path=p), tokenizer).terms[0].own_tokenizer for p in (same, other)
    ]
    assert own[0] is None and own[1].chat_template != tokenizer.chat_template
    assert build_reward_pipeline(config(fn=None, model_path=saved_without), tokenizer).terms[0].own_tokenizer is None
    too_small = save_reward_model(tmp_path / "small", len(tokenizer) - 1)
    with pytest.raises(ConfigError, match=r"reward.model_path=.* embeds 262 tokens but the policy's tokenizer has 263"):
        build_reward_pipeline(config(fn=None, model_path=too_small), tokenizer)


def test_re_encoding_needs_the_raw_prompt(tokenizer, other_tokenizer_dir):
    from rlhf.rewards.pipeline import reward_model_batch

    pipeline = build_reward_pipeline(config(), tokenizer)
    batch, _ = make_batch(tokenizer, ["3+4="], ["7"], ["7"])  # metadata without raw_prompt
    with pytest.raises(DataError, match=r"rows \[0\] of the batch carry no metadata\['raw_prompt'\]"):
        reward_model_batch(load_tokenizer(other_tokenizer_dir), pipeline.inputs(batch))
