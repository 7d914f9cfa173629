"""Length rewards: a plain linear length penalty and DAPO's soft overlong punishment.

Both count response *tokens*, read from metadata["response_length"], which RewardPipeline puts
into every row (the policy tokenizer's count of the generated tokens, EOS included). Their
`max_response_length` is bound by the pipeline to rollout.sampling.max_new_tokens unless the
config gives it, so the limit is typed once.
"""

from __future__ import annotations

from typing import Any

from rlhf.errors import ConfigError, DataError
from rlhf.rewards.registry import REWARD_FUNCTIONS


def response_length(metadata: dict[str, Any], row: int, reward: str) -> int:
    """metadata["response_length"], or DataError saying where it comes from."""
    if "response_length" not in metadata:
        raise DataError(
            f"reward {reward!r}: row {row} has no 'response_length' in its metadata; length rewards run inside "
            "RewardPipeline, which adds the token count of every response"
        )
    return int(metadata["response_length"])


@REWARD_FUNCTIONS.register("overlong_penalty")
def overlong_penalty(
    prompts: list[str],
    responses: list[str],
    metadata: list[dict[str, Any]],
    /,
    *,
    max_response_length: int,
    buffer: int,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13).

    With L = response tokens, L_max = max_response_length and L_cache = buffer:
        0                                 if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache if L_max - L_cache < L <= L_max   (linear, down to -1)
        -1                                if L > L_max
    Add it to the task reward (weight 1 in the paper) so that truncated answers are discouraged
    gradually instead of all scoring as wrong.
    """
    if not 0 < buffer <= max_response_length:
        raise ConfigError(
            f"overlong_penalty: buffer {buffer} must be in (0, max_response_length {max_response_length}]"
        )
    start = max_response_length - buffer
    rewards = []
    for i, meta in enumerate(metadata):
        length = response_length(meta, i, "overlong_penalty")
        if length <= start:
            rewards.append(0.0)
        elif length <= max_response_length:
            rewards.append((start - length) / buffer)
        else:
            rewards.append(-1.0)
    return rewards


@REWARD_FUNCTIONS.register("length_penalty")
def length_penalty(
    prompts: list[str],
    responses: list[str],
    metadata: list[dict[str, Any]],
    /,
    *,
    max_response_length: int,
    target_length: int = 0,
) -> list[float]:
    """A linear penalty on tokens beyond `target_length`: -(L - target) / (max_response_length - target), at most 0.

    0 up to the target, -1 at max_response_length (and below -1 past it). Give it a small weight
    to prefer shorter answers among equally correct ones.
    """
    if not 0 <= target_length < max_response_length:
        raise ConfigError(
            f"length_penalty: target_length {target_length} must be in [0, max_response_length {max_response_length})"
        )
    span = max_response_length - target_length
    return [
        -max(0, response_length(meta, i, "length_penalty") - target_length) / span for i, meta in enumerate(metadata)
    ]
