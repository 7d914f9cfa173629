"""The tiny judge's input and verdict format (its training is measured in judge.json, not asserted here)."""

from rlhf.config import JudgeConfig
from rlhf.data.tiny_world import JUDGE_VERDICTS, Problem
from rlhf.data.tokenizer import encode_chat_prompt
from rlhf.models.tiny_judge import conversation_ids, verdict_ids
from rlhf.rewards.judge import compile_pattern, parse_pointwise


def test_the_judge_reads_the_conversation_exactly_as_the_policy_wrote_it(tiny_tokenizer):
    problem = Problem("add_2d", "hard", "47+5=", "52")
    policy_view = encode_chat_prompt(tiny_tokenizer, problem.prompt)
    policy_view += tiny_tokenizer("42", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert conversation_ids(tiny_tokenizer, problem, "42") == policy_view


def test_verdicts_differ_in_their_first_token_and_parse_to_the_ends_of_the_scale(tiny_tokenizer):
    right, wrong = verdict_ids(tiny_tokenizer, True), verdict_ids(tiny_tokenizer, False)
    assert right[0] != wrong[0] and right[-1] == wrong[-1] == tiny_tokenizer.eos_token_id
    cfg = JudgeConfig()
    pattern = compile_pattern(cfg.pattern, "reward.judge.pattern")
    assert parse_pointwise(JUDGE_VERDICTS[True], pattern, cfg.score_min, cfg.score_max) == 1.0
    assert parse_pointwise(JUDGE_VERDICTS[False], pattern, cfg.score_min, cfg.score_max) == 0.0
