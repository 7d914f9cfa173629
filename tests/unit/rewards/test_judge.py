"""LLM judge without an engine: template checks, rendering, and parsing hand-written verdicts."""

import re

import pytest

from rlhf.config import ClusterConfig, JudgeConfig, ModelConfig, RolloutConfig
from rlhf.errors import ConfigError, DataError
from rlhf.rewards.judge import (
    POINTWISE_FIELDS,
    LLMJudge,
    compile_pattern,
    parse_pairwise,
    parse_pointwise,
    template_fields,
)

POINTWISE = re.compile(JudgeConfig().pattern)
PAIRWISE = re.compile(JudgeConfig().pairwise_pattern)


@pytest.mark.parametrize(
    "verdict, expected",
    [
        ("Score: 7", 6 / 9),  # (7 - 1) / (10 - 1)
        ("score=10", 1.0),
        ("SCORE 1", 0.0),
        ("Score: 2.5", 1.5 / 9),
        ("First thoughts, score: 3. On reflection, Score: 9", 8 / 9),  # the last match counts
        ("Score: 11", None),  # out of [1, 10]
        ("Score: 0", None),
        ("The answer is fine.", None),
        ("", None),
    ],
)
def test_pointwise_verdicts(verdict, expected):
    got = parse_pointwise(verdict, POINTWISE, 1.0, 10.0)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "verdict, expected",
    [("[[A]]", 0), ("Clearly [[B]].", 1), ("[[ b ]]", None), ("[[A]] ... no wait, [[B]]", 1), ("A is better", None)],
)
def test_pairwise_verdicts(verdict, expected):
    assert parse_pairwise(verdict, PAIRWISE) == expected


def test_custom_pattern_and_range():
    pattern = compile_pattern(r"(\d+)/5", "reward.judge.pattern")
    assert parse_pointwise("I give it 4/5", pattern, 0.0, 5.0) == pytest.approx(0.8)


def test_template_checks():
    assert template_fields("{prompt} -> {response} ({reference})", POINTWISE_FIELDS, ("response",), "t") == {
        "prompt",
        "response",
        "reference",
    }
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{answer\}; allowed: \{prompt\}"):
        template_fields("{response} {answer}", POINTWISE_FIELDS, ("response",), "reward.judge.template")
    with pytest.raises(ConfigError, match=r"must contain \{response\}"):
        template_fields("{prompt}", POINTWISE_FIELDS, ("response",), "reward.judge.template")
    with pytest.raises(ConfigError, match="literal braces"):
        template_fields("{response} {", POINTWISE_FIELDS, ("response",), "reward.judge.template")
    with pytest.raises(ConfigError, match="needs a capture group"):
        compile_pattern(r"\d+", "reward.judge.pattern")


def make_judge(**overrides) -> LLMJudge:
    cfg = JudgeConfig(model_path="tiny", **overrides)
    return LLMJudge(cfg, model_cfg=ModelConfig(), rollout_cfg=RolloutConfig(), cluster_cfg=ClusterConfig(), seed=0)


def test_rubric_is_rendered_with_the_reference_and_truncated_from_the_left():
    judge = make_judge(template="Q {prompt} A {response} REF {reference} Score:", use_chat_template=False)
    ids = judge.render(judge.cfg.template, judge.fields, 0, {"answer": "42"}, prompt="6*7=", response="41")
    assert judge.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "").endswith("Q6*7=A41REF42Score:")
    with pytest.raises(DataError, match="row 3 has no reference 'answer'"):
        judge.render(judge.cfg.template, judge.fields, 3, {}, prompt="p", response="r")
    short = make_judge(template="{response} Score:", use_chat_template=False, max_prompt_tokens=3)
    assert len(short.render(short.cfg.template, short.fields, 0, {}, response="a long response here")) == 3


def test_judge_engine_settings_are_greedy_and_separate():
    judge = make_judge(backend="hf", num_engines=2, max_new_tokens=5)
    assert judge.sampling.temperature == 0.0 and judge.sampling.max_new_tokens == 5
    assert (judge.rollout_cfg.backend, judge.rollout_cfg.num_engines, judge.rollout_cfg.enable_sleep) == (
        "hf",
        2,
        False,
    )
    assert judge.cluster_cfg.rollout == ClusterConfig().reward
