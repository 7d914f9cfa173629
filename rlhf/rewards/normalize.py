"""Normalisation of raw reward scores (a reward model's are on an arbitrary scale).

Modes:
  none     scores unchanged (then clipped, if `clip`).
  batch    (x - mean(batch)) / sqrt(var(batch) + eps); a batch of one becomes 0.
  running  (x - mean) / sqrt(var + eps) with the mean and (population) variance of every score
           seen so far, this batch included: the statistics are updated first, then applied, as
           OpenRLHF's reward normalisation does. Merged with Chan et al.'s parallel update, so
           the result does not depend on how the scores were batched.
`clip` then bounds the result to [-clip, clip].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf.errors import ConfigError

MODES = ("none", "running", "batch")


class RewardNormalizer:
    """Stateful only in `running` mode; `state_dict`/`load_state_dict` carry the moments across resumes."""

    def __init__(self, mode: str = "none", *, clip: Optional[float] = None, eps: float = 1e-8):
        if mode not in MODES:
            raise ConfigError(f"reward normalisation mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.clip, self.eps = mode, clip, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, scores: Tensor) -> Tensor:
        scores = scores.double()
        if self.mode == "batch":
            mean, var = scores.mean(), scores.var(unbiased=False) if len(scores) > 1 else torch.zeros(())
            scores = (scores - mean) / torch.sqrt(var + self.eps)
        elif self.mode == "running":
            self.update(scores)
            scores = (scores - self.mean) / (self.var + self.eps) ** 0.5
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores.float()

    @property
    def var(self) -> float:
        """Population variance of the scores seen so far."""
        return self.m2 / self.count if self.count else 0.0

    def update(self, scores: Tensor) -> None:
        """Merge a batch into the running moments (Chan, Golub & LeVeque 1979)."""
        n = len(scores)
        if n == 0:
            return
        batch_mean = float(scores.mean())
        batch_m2 = float(((scores - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
