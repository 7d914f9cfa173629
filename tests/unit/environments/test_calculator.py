"""The calculator tool: exact arithmetic from an AST walk (never eval), bounded, and its environment's answers."""

from __future__ import annotations

import pytest

from rlhf.environments import CalculatorEnv, CalculatorError, evaluate


@pytest.mark.parametrize(
    "expression,value",
    [
        ("37*48", "1776"),
        (" 7 / 2 ", "3.5"),
        ("1/3", "0.333333"),
        ("2**10", "1024"),
        ("-(3-5)", "2"),
        ("17 // 5 + 17 % 5", "5"),
        ("0.1 + 0.2", "0.3"),  # exact decimals, not 0.30000000000000004
        ("2**-2", "0.25"),
    ],
)
def test_values(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression,message",
    [
        ("1/0", "division by zero"),
        ("0**-1", "division by zero"),
        ("2**100", "exponent must be an integer of at most 64"),
        ("9**64**2", "exponent must be an integer of at most 64"),
        ("10**60 * 10**10", "longer than 64 digits"),
        ("__import__('os').system('ls')", "not Call"),
        ("x + 1", "not Name"),
        ("1e999", "not a finite number"),
        ("3 +", "cannot parse"),
    ],
)
def test_refusals(expression, message):
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


def test_environment_answers_calls_and_ends_on_an_answer():
    env = CalculatorEnv()
    assert env.reset({"prompt": "37*48="}) == ""
    result = env.step("<calc>37*48</calc>")
    assert (result.observation, result.done, result.info) == ("1776", False, {"tool_calls": 1})
    error = env.step("first <calc>1+</calc> then <calc>1/0</calc>")  # the last call counts
    assert error.observation == "error: division by zero" and error.info == {"tool_calls": 1, "tool_errors": 1}
    assert env.step("1776").done
