"""Collators: lists of offline examples → RolloutBatch (prompts left-padded, responses right-padded).

Row layouts that the offline losses rely on:
  collate_sequences  row i = example i; loss_mask marks the tokens that carry the loss.
  collate_pairs      row 2i = chosen of pair i, row 2i+1 = rejected of pair i; margins [2n] hold
                     each pair's margin on both of its rows. Any contiguous split into
                     even-sized shards keeps pairs together.
  collate_kto        row 2i = (prompt_i, response_i) with labels 1 (desirable) or 0; row 2i+1 =
                     (prompt_i, response_{(i+1) mod n}), a mismatched pair whose logprobs estimate
                     KTO's KL reference point, with label -1.
  collate_packed     row i = packed row i (rlhf.data.packing): one prompt token, the rest as the
                     response, explicit positions so attention stays inside each example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.data.batch import RolloutBatch, pad_sequences
from rlhf.data.examples import KTOExample, PairExample, SequenceExample
from rlhf.data.packing import PackedRow

KTO_MISMATCHED = -1
"""labels value of the mismatched (KL reference) rows of a KTO batch."""


def _batch(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, *, wheres: Sequence[str], **fields
) -> RolloutBatch:
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id=pad_id, left=True)
    response_ids, response_mask = pad_sequences(responses, pad_id=pad_id, left=False)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        metadata=[{"where": w} for w in wheres],
        **fields,
    )


def collate_sequences(examples: Sequence[SequenceExample], pad_id: int) -> RolloutBatch:
    """PT/SFT examples, one per row, with loss_mask [B, R] (0 on padding)."""
    loss_mask, _ = pad_sequences([e.loss_mask for e in examples], pad_id=0, left=False)
    return _batch(
        [e.prompt_ids for e in examples],
        [e.response_ids for e in examples],
        pad_id,
        wheres=[e.where for e in examples],
        loss_mask=loss_mask,
    )


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> RolloutBatch:
    """2n rows, interleaved: row 2i chosen and row 2i+1 rejected of pair i; margins [2n]."""
    prompts, responses, margins, wheres = [], [], [], []
    for pair in pairs:
        prompts += [pair.prompt_ids, pair.prompt_ids]
        responses += [pair.chosen_ids, pair.rejected_ids]
        margins += [pair.margin, pair.margin]
        wheres += [pair.where, pair.where]
    return _batch(prompts, responses, pad_id, wheres=wheres, margins=torch.tensor(margins, dtype=torch.float32))


def collate_kto(examples: Sequence[KTOExample], pad_id: int, *, max_length: int | None = None) -> RolloutBatch:
    """2n rows, interleaved: (prompt_i, response_i) labelled 1/0, then (prompt_i, response_{i+1 mod n}) labelled -1.

    The mismatched response is cut to fit `max_length` prompt + response tokens when given
    (keeping at least one token). Needs n >= 2, or the "mismatched" response is the row's own.
    """
    n = len(examples)
    if n < 2:
        raise ValueError(f"a KTO batch needs at least 2 examples for its mismatched KL rows, got {n}")
    prompts, responses, labels, wheres = [], [], [], []
    for i, example in enumerate(examples):
        other = examples[(i + 1) % n].response_ids
        if max_length is not None:
            other = other[: max(1, max_length - len(example.prompt_ids))]
        prompts += [example.prompt_ids, example.prompt_ids]
        responses += [example.response_ids, other]
        labels += [int(example.desirable), KTO_MISMATCHED]
        wheres += [example.where, f"{example.where} + response of {examples[(i + 1) % n].where}"]
    return _batch(prompts, responses, pad_id, wheres=wheres, labels=torch.tensor(labels, dtype=torch.long))


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> RolloutBatch:
    """Packed rows: prompt = each row's first token, response = the rest, with positions [B, L].

    response_mask marks real (non-padding) tokens; loss_mask marks the training targets, which
    excludes each packed example's first token, whose logits would look across the boundary.
    """
    prompts = [row.input_ids[:1] for row in rows]
    responses = [row.input_ids[1 : row.num_tokens] for row in rows]
    batch = _batch(prompts, responses, pad_id, wheres=["; ".join(row.where) for row in rows])
    length = batch.prompt_length + batch.response_ids.shape[1]
    loss_mask = torch.zeros_like(batch.response_mask)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        real = row.num_tokens
        loss_mask[i, : real - 1] = torch.as_tensor(row.loss_mask[1:real])
        positions[i, :real] = torch.as_tensor(row.positions[:real])
        positions[i, real:] = torch.arange(length - real)  # padding: a block of its own
    return batch.replace(loss_mask=loss_mask, positions=positions)
