"""Distillation rows: the offline data layer's PT/SFT examples, as teacher-forced batches and as prompts.

Rows are read and tokenised by rlhf.data (load_offline_records, encode_dataset: text,
instruction or messages rows, data.max_length / overlong / loss_on as for SFT; "tiny" and
"tiny:eval" mean the tiny world's SFT rows). Offline steps collate whole examples
(collate_sequences: its loss_mask picks the tokens the loss covers); on-policy steps hand
their prompts to the rollout engines.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhf.config import RLHFConfig
from rlhf.data.batch import RolloutBatch
from rlhf.data.collate import collate_sequences
from rlhf.data.datasets import load_offline_records
from rlhf.data.examples import SequenceExample, encode_dataset
from rlhf.data.stream import PromptBatch, PromptStream
from rlhf.errors import ConfigError

SEQUENCE_FORMATS = ("text", "instruction", "messages")
"""Row formats that give one prompt + response per example (the others are pairs or labels)."""


@dataclass
class DistillRows:
    """Encoded examples; their prompts double as the on-policy prompt set (metadata["row"] indexes them)."""

    examples: list[SequenceExample]
    texts: list[str]
    """Each prompt decoded with its special tokens (what the rollout batch's metadata carries)."""

    def __len__(self) -> int:
        return len(self.examples)

    def head(self, n: int) -> DistillRows:
        """The first `n` rows."""
        return DistillRows(self.examples[:n], self.texts[:n])

    def stream(self, batch_size: int, *, seed: int, shuffle: bool) -> PromptStream:
        prompt_ids = [e.prompt_ids for e in self.examples]
        metadata = [{"row": i} for i in range(len(self))]
        return PromptStream(prompt_ids, self.texts, metadata, batch_size=batch_size, seed=seed, shuffle=shuffle)

    def prompts(self, rows: list[int]) -> PromptBatch:
        return PromptBatch(
            [self.examples[i].prompt_ids for i in rows], [self.texts[i] for i in rows], [{"row": i} for i in rows]
        )

    def batch(self, rows: list[int], *, pad_id: int) -> RolloutBatch:
        """Teacher-forced rows: left-padded prompts, right-padded responses, their loss_mask."""
        return collate_sequences([self.examples[i] for i in rows], pad_id)


def load_distill_rows(
    cfg: RLHFConfig, tokenizer: PreTrainedTokenizerBase, *, eval_limit: int | None = None
) -> tuple[DistillRows, DistillRows | None]:
    """(train, eval or None) rows of data.train / data.mixture and data.eval / data.eval_fraction."""
    kind = "instruction" if cfg.data.format == "auto" else cfg.data.format
    if kind not in SEQUENCE_FORMATS:
        raise ConfigError(
            f"stage=distill reads prompt/response rows; data.format={cfg.data.format!r} is not one of "
            f"{', '.join(SEQUENCE_FORMATS)} (or auto)"
        )
    records = load_offline_records(cfg.data, kind, seed=cfg.run.seed)

    def encode(rows, name: str) -> DistillRows:
        examples = encode_dataset(rows, tokenizer, cfg.data, kind, name=name).examples
        return DistillRows(examples, [tokenizer.decode(e.prompt_ids, skip_special_tokens=False) for e in examples])

    evaluation = None if records.eval is None else encode(records.eval[:eval_limit], "eval")
    return encode(records.train, "train"), evaluation
