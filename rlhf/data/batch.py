"""The typed container in which RL batches cross process boundaries.

Layout (see rlhf/algorithms/__init__.py for the logprob alignment):
  prompt_ids      [B, P]  left-padded prompt tokens
  prompt_mask     [B, P]  1 where a real prompt token sits
  response_ids    [B, R]  right-padded response tokens
  response_mask   [B, R]  1 where a real response token sits (the `mask` of every loss)
Optional per-token fields are [B, R]; per-sequence fields are [B].
The full sequence fed to a model is cat(prompt_ids, response_ids) with attention mask
cat(prompt_mask, response_mask); response token j sits at position P + j.

Offline stages add: `loss_mask` [B, R] (tokens that carry a loss, e.g. only assistant turns;
None means response_mask; attention still follows prompt_mask/response_mask), `margins` [B]
(preference margins), `labels` [B] (KTO: 1 desirable, 0 undesirable, -1 a mismatched row for
the KL reference point), and `positions` [B, P + R], explicit position ids of packed rows
(several examples per row, positions restarting at each; see rlhf.data.packing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_PER_TOKEN = (
    "rollout_logprobs",
    "old_logprobs",
    "ref_logprobs",
    "values",
    "advantages",
    "returns",
    "token_rewards",
    "loss_mask",
)
_PER_SEQUENCE = ("scores", "group_ids", "margins", "labels", "versions")


@dataclass
class RolloutBatch:
    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    # per-token [B, R], filled phase by phase
    rollout_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    token_rewards: Tensor | None = None
    loss_mask: Tensor | None = None
    # per-sequence [B]
    scores: Tensor | None = None
    group_ids: Tensor | None = None
    margins: Tensor | None = None
    labels: Tensor | None = None
    versions: Tensor | None = None  # RL: the policy version (updates applied) of the weights that sampled each row
    # [B, P + R] position ids of packed rows (None: derived from the attention mask)
    positions: Tensor | None = None
    # one entry per row (e.g. the reference answer), never tensors
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        b, p = self.prompt_ids.shape
        r = self.response_ids.shape[1]
        if self.prompt_mask.shape != (b, p):
            raise ValueError(f"prompt_mask shape {tuple(self.prompt_mask.shape)} != {(b, p)}")
        if self.response_ids.shape[0] != b or self.response_mask.shape != (b, r):
            raise ValueError(
                f"response_ids {tuple(self.response_ids.shape)} / response_mask "
                f"{tuple(self.response_mask.shape)} do not match batch {b} × response length {r}"
            )
        for name in _PER_TOKEN:
            value = getattr(self, name)
            if value is not None and value.shape != (b, r):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {(b, r)}")
        for name in _PER_SEQUENCE:
            value = getattr(self, name)
            if value is not None and value.shape != (b,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {(b,)}")
        if self.positions is not None and self.positions.shape != (b, p + r):
            raise ValueError(f"positions has shape {tuple(self.positions.shape)}, expected {(b, p + r)}")
        if self.metadata and len(self.metadata) != b:
            raise ValueError(f"metadata has {len(self.metadata)} rows, expected {b}")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> Tensor:
        """Positions that skip left padding, so a padded row sees the same positions as unpadded;
        the explicit `positions` of a packed batch when set."""
        if self.positions is not None:
            return self.positions
        return (self.attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)

    @property
    def is_packed(self) -> bool:
        return self.positions is not None

    @property
    def effective_loss_mask(self) -> Tensor:
        """The tokens that carry a loss: `loss_mask` when set, else `response_mask`."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def replace(self, **changes: Any) -> RolloutBatch:
        return dataclasses.replace(self, **changes)

    def select(self, index: Tensor | list[int] | slice) -> RolloutBatch:
        """Rows at `index` (a slice, a list of ints or an index tensor)."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        elif isinstance(index, Tensor):
            rows = index.tolist()
        else:
            rows = list(index)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                values[f.name] = v.index_select(0, idx)
            elif f.name == "metadata":
                values[f.name] = [v[i] for i in rows] if v else []
            else:
                values[f.name] = v
        return RolloutBatch(**values)

    def split(self, n: int) -> list[RolloutBatch]:
        """n contiguous shards of equal size; the batch size must divide by n."""
        if n <= 0 or len(self) % n:
            raise ValueError(f"cannot split a batch of {len(self)} rows into {n} equal shards")
        size = len(self) // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    def chunks(self, size: int) -> list[RolloutBatch]:
        """Consecutive pieces of at most `size` rows (the last may be shorter)."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Stack batches row-wise, re-padding prompts on the left and responses on the right."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        p = max(b.prompt_length for b in batches)
        r = max(b.response_ids.shape[1] for b in batches)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(RolloutBatch):
            parts = [getattr(b, f.name) for b in batches]
            if f.name == "metadata":
                values[f.name] = [row for part in parts for row in part] if all(parts) else []
            elif any(x is None for x in parts):
                values[f.name] = None
            elif f.name in ("prompt_ids", "prompt_mask"):
                values[f.name] = torch.cat([_pad(x, p, left=True) for x in parts])
            elif f.name == "positions":  # prompt part padded on the left, response part on the right
                values[f.name] = torch.cat([_pad_positions(x, b.prompt_length, p, r) for x, b in zip(parts, batches)])
            elif f.name in _PER_SEQUENCE:
                values[f.name] = torch.cat(parts)
            else:
                values[f.name] = torch.cat([_pad(x, r, left=False) for x in parts])
        return RolloutBatch(**values)

    def to(self, device: torch.device | str) -> RolloutBatch:
        return self.replace(
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            }
        )


def _pad(x: Tensor, length: int, *, left: bool) -> Tensor:
    missing = length - x.shape[1]
    if missing == 0:
        return x
    pad = torch.zeros(x.shape[0], missing, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def _pad_positions(positions: Tensor, prompt_length: int, p: int, r: int) -> Tensor:
    prompt, response = positions[:, :prompt_length], positions[:, prompt_length:]
    return torch.cat([_pad(prompt, p, left=True), _pad(response, r, left=False)], dim=1)


def pad_sequences(rows: list[list[int]], *, pad_id: int, left: bool, dtype=torch.long) -> tuple[Tensor, Tensor]:
    """Pad ragged token lists into (ids [B, L], mask [B, L])."""
    length = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), length), pad_id, dtype=dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        sl = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, sl] = torch.as_tensor(row, dtype=dtype)
        mask[i, sl] = 1
    return ids, mask


def rollout_rows(
    prompt_rows: list[list[int]],
    response_rows: list[list[int]],
    logprob_rows: list[list[float]],
    group_ids: list[int],
    metadata: list[dict[str, Any]],
    *,
    pad_id: int,
    loss_mask_rows: list[list[int]] | None = None,
) -> RolloutBatch:
    """Sampled rows as a RolloutBatch: prompts left-padded, responses with their engine logprobs (and loss mask, for
    multi-turn rows) right-padded."""
    prompt_ids, prompt_mask = pad_sequences(prompt_rows, pad_id=pad_id, left=True)
    response_ids, response_mask = pad_sequences(response_rows, pad_id=pad_id, left=False)
    rollout_logprobs, _ = pad_sequences(logprob_rows, pad_id=0, left=False, dtype=torch.float)
    loss_mask = None if loss_mask_rows is None else pad_sequences(loss_mask_rows, pad_id=0, left=False)[0]
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        loss_mask=loss_mask,
        rollout_logprobs=rollout_logprobs,
        group_ids=torch.tensor(group_ids),
        metadata=metadata,
    )
