"""One multi-turn trajectory as token ids: what the model sampled and what the environment said, never re-tokenized.

A trajectory is its prompt's ids followed by turns: each model turn's ids exactly as the engine sampled them (with
their logprobs) and each observation's ids as rendered once (`ObservationRenderer`). The next turn's context is
the concatenation, so the ids the trainer scores are the ids that were sampled plus the environment's. Rendering
the conversation as text and tokenizing it again would not give them back: a tokenizer can merge the last
sampled token with the first character of the observation, or split a turn boundary otherwise, and the trainer
would then score tokens the policy never sampled (the drift that makes multi-turn PPO/GRPO diverge).

`loss_mask` is 1 on model tokens and 0 on environment tokens, which get no loss, no KL and no entropy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import ConfigError

TRAJECTORY_ENDS = ("done", "max_turns", "max_tokens", "error")
"""Why a trajectory ended: the environment said done, the turn limit, the token limit, or the environment raised."""


@dataclass
class Trajectory:
    prompt_ids: list[int]
    row: dict[str, Any]
    """The prompt row (its metadata), as the environment's reset got it."""
    response_ids: list[int] = field(default_factory=list)
    """Every token after the prompt: model turns and observations, in order."""
    loss_mask: list[int] = field(default_factory=list)
    """Per response token: 1 sampled by the model, 0 from the environment."""
    logprobs: list[float] = field(default_factory=list)
    """Per response token: the engine's logprob of a model token, 0.0 for an environment token."""
    turn_rewards: list[float] = field(default_factory=list)
    """The environment's reward for each model turn it answered."""
    counters: Counter = field(default_factory=Counter)
    """The environment's info counters summed (tool_calls, tool_errors, ...) plus the rollout's own (timeouts)."""
    turns: int = 0
    """Model turns sampled."""
    end: str = ""
    """Why it ended (one of TRAJECTORY_ENDS); "" while it runs."""

    @property
    def finished(self) -> bool:
        return bool(self.end)

    def context(self) -> list[int]:
        """The ids the next model turn continues: the prompt and every turn so far, as sampled and rendered."""
        return self.prompt_ids + self.response_ids

    @property
    def last_token(self) -> int | None:
        """The context's last id (what an observation is appended after), without building the context."""
        return (self.response_ids or self.prompt_ids or [None])[-1]

    def add_model_turn(self, token_ids: list[int], logprobs: list[float]) -> None:
        if len(token_ids) != len(logprobs):
            raise ValueError(f"a model turn of {len(token_ids)} tokens came with {len(logprobs)} logprobs")
        self.response_ids += token_ids
        self.loss_mask += [1] * len(token_ids)
        self.logprobs += logprobs
        self.turns += 1

    def add_observation(self, token_ids: list[int]) -> None:
        self.response_ids += token_ids
        self.loss_mask += [0] * len(token_ids)
        self.logprobs += [0.0] * len(token_ids)

    def truncate(self, max_tokens: int) -> bool:
        """Keep the first `max_tokens` response tokens (a prefix of a sample is a valid sample); True if cut."""
        if len(self.response_ids) <= max_tokens:
            return False
        del self.response_ids[max_tokens:], self.loss_mask[max_tokens:], self.logprobs[max_tokens:]
        return True

    @property
    def environment_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)


class ObservationRenderer:
    """An observation's token ids: `template` (with "{observation}") filled and tokenized once, on its own.

    The template carries the turn markers the policy was trained with: "{observation}" appends the bare text
    (the calculator task's "37*48=<calc>37*48</calc>1776"), a chat model wants its tool turn, for a Qwen-style
    template "<|im_end|>\\n<|im_start|>tool\\n{observation}<|im_end|>\\n<|im_start|>assistant\\n" when the model
    turn stops on the tool call's stop string (rlhf.data.tokenizer.tool_turn_template derives it from the chat
    template). Such a rendering opens by closing the model's turn; when the model closed it itself (its last token
    is that same special token, e.g. it ended on <|im_end|>), the token is not written twice."""

    def __init__(
        self, encode: Callable[[str], list[int]], template: str = "{observation}", special_ids: Collection[int] = ()
    ) -> None:
        if "{observation}" not in template:
            raise ConfigError(f"agent.observation_template must contain {{observation}} (got {template!r})")
        self.encode = encode
        self.template = template
        self.special_ids = frozenset(special_ids)

    def __call__(self, observation: str, previous: int | None = None) -> list[int]:
        """The ids to append after a context whose last token is `previous`."""
        if not observation:
            return []
        ids = self.encode(self.template.replace("{observation}", observation))
        if ids and ids[0] == previous and previous in self.special_ids:
            return ids[1:]
        return ids
