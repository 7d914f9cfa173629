"""Forward passes that turn a RolloutBatch into per-response-token logprobs (and entropy).

Alignment: logits at position P + j - 1 predict response token j (P = padded prompt length),
so the returned [B, R] tensors follow the convention of rlhf.algorithms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.data.batch import RolloutBatch


def _token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    # gather minus logsumexp: avoids materialising a full [B, R, V] log_softmax
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_logits(model: torch.nn.Module, batch: RolloutBatch, *, temperature: float = 1.0) -> Tensor:
    """Logits [B, R, V] (float32, divided by temperature) that predict each response token."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    p = batch.prompt_length
    r = batch.response_ids.shape[1]
    logits = out.logits[:, p - 1 : p - 1 + r, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def response_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(logprobs [B, R], entropy [B, R] or None) of the batch's response tokens under `model`."""
    logits = response_logits(model, batch, temperature=temperature)
    logprobs = _token_logprobs(logits, batch.response_ids)
    entropy = _entropy(logits) if with_entropy else None
    return logprobs, entropy
