"""Rule-based (verifiable) rewards: answer checks and format checks, no model involved.

All follow the batched signature of rlhf.rewards.registry; hyperparameters are keyword-only.
Answer-checking rewards read the reference from metadata["answer"].
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from rlhf.data.tiny_world import check_answer
from rlhf.errors import ConfigError, DataError
from rlhf.rewards.registry import REWARD_FUNCTIONS

logger = logging.getLogger(__name__)

_BARE_ANSWER = re.compile(r"\s*(-?\d+(?:\.\d+)?|[A-Za-z]+)\s*")


def reference_answer(metadata: dict[str, Any], row: int, reward: str) -> str:
    """metadata["answer"] as a string, or DataError saying how to get the answer into the batch."""
    if "answer" not in metadata or metadata["answer"] is None:
        raise DataError(
            f"reward {reward!r}: row {row} has no reference 'answer' in its metadata (fields: {', '.join(sorted(metadata)) or 'none'}); "
            "load the prompts with answer_key=<the answer column> so the reference reaches the reward"
        )
    return str(metadata["answer"])


@REWARD_FUNCTIONS.register("tiny_world")
def tiny_world_reward(
    prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], /, *, format_bonus: float = 0.0
) -> list[float]:
    """1.0 when rlhf.data.tiny_world.check_answer accepts the response's final answer, else 0.0.

    With `format_bonus` > 0, a response that is the bare answer and nothing else (one number or
    one word, surrounding whitespace allowed) earns that much on top, right or wrong: it rewards
    the format the tiny models were warmed up on, so a reward of 1 + bonus means right and tidy.
    """
    rewards = []
    for i, (response, meta) in enumerate(zip(responses, metadata)):
        reward = 1.0 if check_answer(response, reference_answer(meta, i, "tiny_world")) else 0.0
        if format_bonus and _BARE_ANSWER.fullmatch(response):
            reward += format_bonus
        rewards.append(reward)
    return rewards


@REWARD_FUNCTIONS.register("exact_match")
def exact_match_reward(
    prompts: list[str],
    responses: list[str],
    metadata: list[dict[str, Any]],
    /,
    *,
    strip: bool = True,
    case_sensitive: bool = True,
) -> list[float]:
    """1.0 when the whole response equals metadata["answer"] (after optional strip / case folding)."""

    def normalize(text: str) -> str:
        text = text.strip() if strip else text
        return text if case_sensitive else text.casefold()

    return [
        float(normalize(r) == normalize(reference_answer(m, i, "exact_match")))
        for i, (r, m) in enumerate(zip(responses, metadata))
    ]


@REWARD_FUNCTIONS.register("math")
def math_reward(
    prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], /, *, timeout_seconds: int = 5
) -> list[float]:
    """1.0 when math-verify finds the response's final answer equal to metadata["answer"].

    Equality is mathematical (1/2 == 0.5 == \\frac{1}{2}); \\boxed{} answers are preferred. A
    GSM8K-style reference ("... #### 72") is reduced to the text after "####". math-verify bounds
    its work with SIGALRM, which only the main thread may use, so off the main thread (threaded
    actors) `timeout_seconds` is not enforced.
    """
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ConfigError(
            "the 'math' reward needs the math-verify package: pip install 'math-verify[antlr4_13_2]'"
        ) from e
    timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    rewards = []
    for i, (response, meta) in enumerate(zip(responses, metadata)):
        answer = reference_answer(meta, i, "math").rpartition("####")[2].strip()
        gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$", parsing_timeout=timeout)
        if not gold:
            raise DataError(
                f"reward 'math': row {i} reference answer {answer!r} cannot be parsed as math; fix or drop the row"
            )
        predicted = parse(response, parsing_timeout=timeout)
        rewards.append(1.0 if predicted and verify(gold, predicted, timeout_seconds=timeout) else 0.0)
    return rewards


@REWARD_FUNCTIONS.register("format_regex")
def format_regex_reward(
    prompts: list[str],
    responses: list[str],
    metadata: list[dict[str, Any]],
    /,
    *,
    pattern: str,
    full_match: bool = False,
    reward: float = 1.0,
) -> list[float]:
    """`reward` when the response matches the regex `pattern` (anywhere, or whole if `full_match`), else 0.0.

    Flags go inline in the pattern, e.g. "(?s)<think>.*</think>.*\\\\boxed\\{.+\\}".
    """
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"format_regex pattern {pattern!r} is not a valid regular expression: {e}") from e
    match = compiled.fullmatch if full_match else compiled.search
    return [reward if match(response) else 0.0 for response in responses]
