"""Forward passes that turn a RolloutBatch into per-response-token logprobs (and entropy).

Alignment: logits at position P + j - 1 predict response token j (P = padded prompt length),
so the returned [B, R] tensors follow the convention of rlhf.algorithms.

`response_logprobs`, `response_token_logits` and `last_token_scores` also take a token-budget
micro-batch (rlhf.data.token_budget.PackedMicroBatch: the rows' real tokens in one packed row):
they compute the outputs of the real response tokens only and return them in the rows' [B, R]
layout (zero at padding), equal to the padded computation's at every real token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import MicroBatch, PackedMicroBatch


def _token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    # gather minus logsumexp: avoids materialising a full [B, R, V] log_softmax
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def forward_inputs(batch: RolloutBatch, *, flatten: bool = False) -> dict[str, Tensor | None]:
    """The keyword inputs of a causal-LM forward pass over the batch's full sequences.

    A packed batch (batch.positions set, several examples per row with positions restarting at
    0) is passed with attention_mask=None and its position ids: transformers then starts a new
    causal block wherever the positions do not increase by one (masking_utils.
    find_packed_sequence_indices, used by the sdpa/eager/flex masks; checked on 5.19), so no
    token attends across an example boundary. A 2D padding mask would switch that detection
    off, and padding needs none here: a packed row's padding is a block of its own whose
    outputs carry no loss. flash-attention reads packed position ids only from a batch of one
    row (modeling_flash_attention_utils._is_packed_sequence), so `flatten` concatenates the rows
    into one [1, B·L] row; every row starts at position 0, so row boundaries stay boundaries.
    """
    if batch.positions is None:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
        }
    if flatten:
        return {
            "input_ids": batch.input_ids.reshape(1, -1),
            "attention_mask": None,
            "position_ids": batch.positions.reshape(1, -1),
        }
    return {"input_ids": batch.input_ids, "attention_mask": None, "position_ids": batch.positions}


def needs_flat_packing(model: torch.nn.Module) -> bool:
    """True when the model attends with flash-attention, which sees packing only in a one-row batch."""
    config = getattr(getattr(model, "module", model), "config", None)  # .module: a DeepSpeed engine
    return "flash" in str(getattr(config, "_attn_implementation", ""))


def full_logits(model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
    """Logits [B, P + R, V] of the batch's full sequences (packed batches included)."""
    flatten = batch.positions is not None and needs_flat_packing(model)
    logits = model(**forward_inputs(batch, flatten=flatten), use_cache=False).logits
    return logits.view(len(batch), -1, logits.shape[-1]) if flatten else logits


def response_logits(model: torch.nn.Module, batch: RolloutBatch, *, temperature: float = 1.0) -> Tensor:
    """Logits [B, R, V] (float32, divided by temperature) that predict each response token.

    Packed batches are supported (see `forward_inputs`); the logits at the first token of each
    packed example look across the boundary and must carry no loss (collate_packed's loss_mask
    is 0 there).
    """
    logits = full_logits(model, batch)
    p = batch.prompt_length
    r = batch.response_ids.shape[1]
    logits = logits[:, p - 1 : p - 1 + r, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def response_token_logits(
    model: torch.nn.Module, batch: MicroBatch, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(logits, labels) of the response tokens (float32 logits, divided by temperature).

    Padded rows: logits [B, R, V] and labels [B, R] (`response_logits`). A packed micro-batch:
    logits [N, V] and labels [N] of its N real response tokens only, so no softmax is spent on
    prompt or padding positions; `to_rows(batch, x)` maps an [N] result to [B, R].
    """
    if not isinstance(batch, PackedMicroBatch):
        return response_logits(model, batch, temperature=temperature), batch.response_ids
    logits = full_logits(model, batch.inputs)[0, batch.response_index].float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits, batch.response_ids


def to_rows(batch: MicroBatch, values: Tensor) -> Tensor:
    """`response_token_logits`-shaped per-token values in the rows' [B, R] layout (packed: unpacked)."""
    return batch.unpack(values) if isinstance(batch, PackedMicroBatch) else values


def response_logprobs(
    model: torch.nn.Module, batch: MicroBatch, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(logprobs [B, R], entropy [B, R] or None) of the batch's response tokens under `model`."""
    logits, labels = response_token_logits(model, batch, temperature=temperature)
    logprobs = to_rows(batch, _token_logprobs(logits, labels))
    entropy = to_rows(batch, _entropy(logits)) if with_entropy else None
    return logprobs, entropy


def last_token_scores(model: torch.nn.Module, batch: MicroBatch) -> Tensor:
    """[B] scalar head of a sequence-classification model at each row's last real token (float32).

    The last real token comes from the attention mask, not from pad_token_id (pad may equal eos),
    the one scoring rule of the RM stage's training and the RL RewardWorker, so a trained RM scores the same there.
    """
    backbone = getattr(model, model.base_model_prefix)
    if isinstance(batch, PackedMicroBatch):
        hidden = backbone(**forward_inputs(batch.inputs), use_cache=False).last_hidden_state
        return model.score(hidden[0, batch.last_index]).squeeze(-1).float()
    hidden = backbone(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    mask = batch.attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.zeros_like(positions)).max(dim=1).values
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(last_hidden).squeeze(-1).float()
