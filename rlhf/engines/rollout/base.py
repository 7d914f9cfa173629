"""The rollout backend interface: token ids in, sampled responses with their logprobs out.

Conventions shared by every backend:
  - Prompts and responses are token ids; `text` is a convenience decode (special tokens skipped,
    stop strings cut off). Training uses `token_ids` and `logprobs` only.
  - `logprobs[j]` is the log-probability of `token_ids[j]` under the distribution it was drawn
    from: log_softmax of the logits divided by the temperature, after top-k and top-p (vLLM's
    `logprobs_mode="processed_logprobs"`). Greedy decoding (temperature below GREEDY_BELOW) reports
    the untempered log_softmax, as vLLM does. So they are the behaviour policy's logprobs, fit for
    importance sampling, and without top-k/top-p they equal what the trainer computes,
    `rlhf.models.logprobs.response_logprobs(model, batch, temperature=logprob_temperature(sampling))`.
    With top-k/top-p the engine's value is larger by -log(probability mass kept).
  - A response ends with EOS ("stop", the EOS token is included in `token_ids`), a stop string
    ("stop", the tokens are kept, the text is cut before the string), or `max_new_tokens`
    ("length").
  - Seeds: with a base `seed`, sample j of prompt i is drawn with seed `seed + i * n + j`, so the
    samples of one call are independent and a `RolloutGroup` that spreads prompts over engines
    (passing each engine `seed + offset * n`) gives the same samples for any number of engines
    of one backend. `seed=None` draws fresh randomness.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from rlhf.algorithms.registry import Registry
from rlhf.config import ClusterConfig, ModelConfig, RolloutConfig, SamplingConfig
from rlhf.engines.checksum import Checksums

FINISH_REASONS = ("stop", "length")
SLEEP_TAGS = ("weights", "kv_cache")
"""What a sleeping engine has released, in the order `wake_up` should take it back (vLLM's tag names)."""
GREEDY_BELOW = 1e-5
"""Temperatures below this mean greedy decoding (vLLM's _SAMPLING_EPS); n greedy samples are identical."""


def logprob_temperature(sampling: SamplingConfig) -> float:
    """The temperature of every logprob of samples drawn with `sampling`: its temperature, or 1.0 for greedy.

    Engines report logprobs at it (module docstring), and the trainers score those samples at it:
    the policy's old and new logprobs and entropy, the reference's logprobs, online DPO's policy
    and reference. Greedy decoding divides by nothing (vLLM treats a temperature below
    GREEDY_BELOW as 1.0 when it computes logprobs), so neither do we.
    """
    return 1.0 if sampling.temperature < GREEDY_BELOW else sampling.temperature


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]
    """Response tokens (EOS included when the response stopped on it)."""
    logprobs: list[float]
    """Logprob of each response token under the sampling distribution (temperature, top-k, top-p applied;
    see the module docstring); same length as token_ids."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_new_tokens reached)."""
    text: str = field(default="")
    """Decoded response, special tokens skipped, stop string removed."""


class RolloutBackend(Protocol):
    """A generation engine living in one process; `RolloutWorker` hosts one per Ray actor."""

    def __init__(
        self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, cluster_cfg: ClusterConfig, seed: int
    ) -> None: ...

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: int | None
    ) -> list[list[Generation]]:
        """Per prompt, `n` generations (see the module docstring for logprob and seed conventions)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        """Copy weights (Hugging Face checkpoint names) into the live model, in place.

        `share`: the tensors stay valid, and change only during the next `load_weights` (the
        shared-memory weight sync), so a backend may adopt them as its weights instead of copying.
        Cached prompt prefixes still hold the old weights' KV: call `reset_prefix_cache` next.
        """
        ...

    reads_back_weights: bool
    """Whether `loaded_checksums` can read the live weights back by their checkpoint names; False where the loader
    repacks them (vLLM fuses and reorders): the weight sync then checksums what arrived instead."""

    def loaded_checksums(self, names: Sequence[str]) -> Checksums:
        """Checksums (rlhf.engines.checksum) of the live weights named `names`, after `load_weights` (only where
        `reads_back_weights`)."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory until `wake_up` (rollout.enable_sleep on cuda; no-op otherwise): the KV
        cache is dropped and the weights move to host memory (vLLM's sleep level 1)."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take back what `sleep` released: `tags` from SLEEP_TAGS ("weights" first, so new weights can be
        loaded before the KV cache is allocated again), None for all; no-op where `sleep` is."""
        ...

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (their KV was computed by the old weights)."""
        ...


ROLLOUT_BACKENDS: Registry[type[RolloutBackend]] = Registry("rollout backend")
"""Backends by the name `RolloutConfig.backend` uses: "vllm", "hf"."""
