"""Loading reward functions by name or import path, with checked keyword arguments."""

import math
import textwrap

import pytest

from rlhf.errors import ConfigError, RLHFError
from rlhf.rewards import REWARD_FUNCTIONS, load_reward_fn, score

# Arguments each registered reward needs to be loaded, and one row it can score.
LOAD_ARGS = {
    "format_regex": {"pattern": r"\d"},
    "length_penalty": {"max_response_length": 8},
    "overlong_penalty": {"max_response_length": 8, "buffer": 4},
}
ROW = (["3+4="], ["7"], [{"answer": "7", "response_length": 1}])


def test_builtin_rewards_are_registered():
    assert {"tiny_world", "exact_match", "math", "format_regex", "length_penalty", "overlong_penalty"} <= set(
        REWARD_FUNCTIONS.names()
    )


@pytest.mark.parametrize("name", REWARD_FUNCTIONS.names())
def test_every_registered_reward_scores_a_batch(name):
    fn = load_reward_fn(name, **LOAD_ARGS.get(name, {}))
    assert fn([], [], []) == []
    rewards = score(fn, *ROW, name=name)
    assert len(rewards) == 1 and all(isinstance(r, float) and math.isfinite(r) for r in rewards)


def test_unknown_name_lists_known_names_close_matches_first():
    with pytest.raises(ConfigError, match=r"unknown reward function 'exact_mach'; known: exact_match, .*tiny_world"):
        load_reward_fn("exact_mach")


def test_kwargs_are_bound_and_checked():
    fn = load_reward_fn("tiny_world", format_bonus=0.5)
    assert fn([""], ["7"], [{"answer": "7"}]) == [1.5]
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) bonus; it accepts: format_bonus"):
        load_reward_fn("tiny_world", bonus=0.5)
    with pytest.raises(ConfigError, match=r"'format_regex' needs argument\(s\) pattern"):
        load_reward_fn("format_regex")


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_reward(prompts, responses, metadata, *, scale=1.0):
                return [scale * len(r) for r in responses]

            def two_args(prompts, responses):
                return []

            def broken(prompts, responses, metadata):
                return None

            NOT_A_FUNCTION = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_import_path_reward_works_with_kwargs(plugin_module):
    fn = load_reward_fn(f"{plugin_module}:length_reward", scale=0.5)
    assert fn(["p", "p"], ["ab", "abcd"], [{}, {}]) == [1.0, 2.0]


@pytest.mark.parametrize(
    "path, match",
    [
        ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz'"),
        (
            "my_rewards:nope",
            r"module 'my_rewards' has no attribute 'nope'; its callables: broken, length_reward, two_args",
        ),
        ("my_rewards:NOT_A_FUNCTION", r"is a int, not a function"),
        ("my_rewards:two_args", r"must take \(prompts, responses, metadata\)"),
        ("my_rewards:broken", r"must return a list of floats"),
        ("my_rewards:", r"must look like 'package.module:function'"),
    ],
)
def test_bad_import_paths_explain_themselves(plugin_module, path, match):
    with pytest.raises(ConfigError, match=match):
        load_reward_fn(path)


def test_score_checks_the_returned_rewards():
    with pytest.raises(RLHFError, match="returned 0 rewards for 1 responses"):
        score(lambda p, r, m: [], *ROW)
    with pytest.raises(RLHFError, match="non-finite rewards at rows"):
        score(lambda p, r, m: [float("nan")], *ROW)
