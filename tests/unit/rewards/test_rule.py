"""Rule rewards on hand-made cases."""

import pytest

from rlhf.errors import ConfigError, DataError
from rlhf.rewards import load_reward_fn
from rlhf.rewards.rule import exact_match_reward, format_regex_reward, math_reward, tiny_world_reward


def _meta(*answers):
    return [{"answer": a} for a in answers]


def test_tiny_world_reward_checks_the_final_answer():
    responses = ["7", "3+4=7", "8", "", "dcba"]
    rewards = tiny_world_reward([""] * 5, responses, _meta("7", "7", "7", "7", "dcba"))
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_tiny_world_format_bonus_pays_for_a_bare_answer_right_or_wrong():
    rewards = tiny_world_reward(["", "", ""], ["7", "it is 7", " 8 "], _meta("7", "7", "7"), format_bonus=0.1)
    assert rewards == [1.1, 1.0, 0.1]


def test_exact_match_options():
    assert exact_match_reward(["", ""], [" Paris ", "paris"], _meta("Paris", "Paris")) == [1.0, 0.0]
    assert exact_match_reward([""], ["paris"], _meta("Paris"), case_sensitive=False) == [1.0]
    assert exact_match_reward([""], [" Paris"], _meta("Paris"), strip=False) == [0.0]


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("so the result is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("$\\frac{2}{4}$", "\\frac{1}{2}", 1.0),
        ("The answer is 72.", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("I do not know", "4", 0.0),
    ],
)
def test_math_reward_hand_cases(response, answer, expected):
    assert math_reward([""], [response], _meta(answer)) == [expected]


def test_math_reward_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, [""], ["\\boxed{2}"], _meta("2")).result() == [1.0]


def test_format_regex_search_and_full_match():
    responses = ["<think>x</think> 7", "7"]
    assert format_regex_reward(["", ""], responses, [{}, {}], pattern=r"<think>.*</think>") == [1.0, 0.0]
    assert format_regex_reward(["", ""], responses, [{}, {}], pattern=r"\d", full_match=True) == [0.0, 1.0]
    assert format_regex_reward([""], ["7"], [{}], pattern=r"\d", reward=0.5) == [0.5]


def test_missing_reference_answer_says_how_to_provide_it():
    with pytest.raises(DataError, match=r"row 1 has no reference 'answer'.*fields: task.*answer_key"):
        tiny_world_reward(["", ""], ["7", "7"], [{"answer": "7"}, {"task": "add"}])


def test_bad_regex_fails_when_loading():
    with pytest.raises(ConfigError, match=r"pattern '\(' is not a valid regular expression"):
        load_reward_fn("format_regex", pattern="(")
