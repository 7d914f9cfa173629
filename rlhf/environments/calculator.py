"""The calculator tool: exact integer and decimal arithmetic on an expression, never `eval`.

The policy calls it by writing `<calc>EXPRESSION</calc>` (the rollout stops a turn at "</calc>"); the environment
answers with the value and the model goes on: "37*48=<calc>37*48</calc>1776" is one prompt, one model turn
("<calc>37*48</calc>"), the observation "1776" and the model's final turn. A turn without a call is the answer.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from typing import Any

from rlhf.environments.base import ENVIRONMENTS, Environment, StepResult

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
CALL_END = "</calc>"
"""The stop string that ends a turn with a tool call (rollout.sampling.stop needs it)."""
MAX_EXPONENT = 64
MAX_DIGITS = 64
"""Bounds that keep one call cheap: 2**10**10 would run for ever."""

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; its text is the observation."""


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression (+ - * / // % **, parentheses, integers and decimals), as text:
    an integer when the value is one, else a decimal rounded to 6 places."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot parse {expression.strip()!r}") from None
    value = _value(tree.body)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0")


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        try:
            return Fraction(str(node.value))
        except (ValueError, OverflowError):  # 1e999 parses as inf
            raise CalculatorError(f"{node.value} is not a finite number") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"exponent must be an integer of at most {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise CalculatorError("division by zero")
        result = Fraction(_BINARY[type(node.op)](left, right))
        if len(str(abs(result.numerator))) > MAX_DIGITS:
            raise CalculatorError(f"result longer than {MAX_DIGITS} digits")
        return result
    raise CalculatorError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def parse_call(action: str) -> str | None:
    """The expression of the last `<calc>...</calc>` call in a model turn, None if the turn makes none."""
    calls = CALL.findall(action)
    return calls[-1] if calls else None


@ENVIRONMENTS.register("calculator")
class CalculatorEnv(Environment):
    """Answers each `<calc>EXPRESSION</calc>` call with the value (or "error: ..."); a turn without a call ends
    the trajectory (the reward pipeline scores the answer). Tool calls and errors are counted."""

    stop = (CALL_END,)

    def __init__(self, error_prefix: str = "error: ") -> None:
        self.error_prefix = error_prefix

    def reset(self, row: dict[str, Any]) -> str:
        return ""

    def step(self, action: str) -> StepResult:
        expression = parse_call(action)
        if expression is None:
            return StepResult(done=True)
        try:
            return StepResult(evaluate(expression), info={"tool_calls": 1})
        except CalculatorError as error:
            return StepResult(f"{self.error_prefix}{error}", info={"tool_calls": 1, "tool_errors": 1})
