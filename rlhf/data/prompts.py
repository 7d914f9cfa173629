"""Prompt datasets for RL: load, validate, and tokenize prompts; keep the rest of each row.

A prompt row has a prompt (plain text, or chat `messages` ending with a user turn) and, for
verifiable rewards, a reference answer. Every other field of the row travels with it as
metadata, which the rollout batch carries to the reward functions (RolloutBatch.metadata).
`metadata["answer"]` is always the reference answer, whatever the column was called.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from rlhf.data.formats import Messages, require_field, require_prompt
from rlhf.data.sources import Record, read_records
from rlhf.data.tokenizer import encode_chat_prompt
from rlhf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

RAW_PROMPT = "raw_prompt"
"""Metadata key of the prompt as the dataset wrote it (text or chat messages), added by
`prompt_metadata`: a reward model with its own tokenizer re-renders the conversation from it."""

TINY_SOURCES = ("tiny", "tiny:train", "tiny:eval")
"""Whole tiny-world prompt sets. A task subset is written "tiny:<split>:<task>+<task>..." (see
`load_prompt_dataset`), e.g. "tiny:train:copy+reverse+add_1d+sub_1d"."""
TINY_CARRY_SOURCES = {"tiny:carry:train": "train", "tiny:carry:eval": "eval"}
"""The carry world's prompts (rlhf.data.tiny_world: the add_2d grid split, 720 train / 180 held out)."""
TINY_TOOL_SOURCES = {"tiny:tool:train": "train", "tiny:tool:eval": "eval"}
"""The tool world's prompts (rlhf.data.tiny_world.tool_file: 3-digit × 2-digit products, 1000 train / 200 held out)."""


@dataclass(frozen=True)
class PromptExample:
    """One prompt, the row's other fields (with the reference under "answer"), and its location."""

    prompt: str | Messages
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def load_prompt_dataset(
    source: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    split: str = "train",
) -> list[PromptExample]:
    """Load and validate prompts from a file, a directory, a Hub dataset, or the tiny world.

    Args:
        source: a local .json/.jsonl/.csv/.parquet file or a directory of them, a Hub dataset
            name ("org/name"), or "tiny" / "tiny:train" / "tiny:eval" for the tiny world's RL
            prompts (rlhf.data.tiny_world; "tiny" follows `split`), or a task subset of them,
            "tiny:carry:train" / "tiny:carry:eval" for the carry world's (the recipes'), or
            "tiny:<split>:<task>+<task>..." (e.g. "tiny:train:copy+reverse+add_1d+sub_1d"; "+"
            rather than "," so the name survives a Hydra override). In a subset every listed task
            is equally common: rows of the smaller tasks are repeated, in order, up to the count
            of the largest (the tiny world has 800 train problems of most tasks but only 80
            add_1d and 44 sub_1d), so a uniformly shuffled stream sees each task as often.
        prompt_key: the column holding the prompt (a string, or a list of chat messages).
        answer_key: the column holding the reference answer, stored as metadata["answer"];
            None when the reward needs no reference (a reward model, an LLM judge).
        split: which split of a directory or Hub dataset to read.

    Raises:
        DataError: naming the file, the row and the field, when a row is unusable.
    """
    if str(source) in TINY_SOURCES:
        from rlhf.data.tiny_world import tiny_world_dir

        tiny_split = str(source).partition(":")[2] or split
        source = tiny_world_dir().data("rl", tiny_split)
    elif str(source) in TINY_CARRY_SOURCES:
        from rlhf.data.tiny_world import tiny_world_dir

        source = tiny_world_dir().data("carry", TINY_CARRY_SOURCES[str(source)])
    elif str(source) in TINY_TOOL_SOURCES:
        from rlhf.data.tiny_world import tool_file

        source = tool_file("rl", TINY_TOOL_SOURCES[str(source)])
    elif str(source).startswith("tiny:"):
        return _tiny_task_subset(str(source), prompt_key, answer_key)
    examples = [_prompt_example(r, prompt_key, answer_key) for r in read_records(source, split=split)]
    logger.info("loaded %d prompts from %s", len(examples), source)
    return examples


def _tiny_task_subset(source: str, prompt_key: str, answer_key: str | None) -> list[PromptExample]:
    """Rows of "tiny:<split>:<task>+<task>...", each listed task repeated up to the largest count."""
    from rlhf.data.tiny_world import TASKS, tiny_world_dir

    parts = source.split(":")
    known = [t.name for t in TASKS]
    if len(parts) != 3 or parts[1] not in ("train", "eval") or not parts[2]:
        raise ConfigError(
            f"unknown tiny prompt source {source!r}; use one of {', '.join((*TINY_SOURCES, *TINY_CARRY_SOURCES, *TINY_TOOL_SOURCES))} or "
            f"'tiny:<train|eval>:<task>+<task>...' with tasks from {', '.join(known)}"
        )
    tasks = parts[2].split("+")
    unknown = [t for t in tasks if t not in known]
    if unknown or len(set(tasks)) != len(tasks):
        raise ConfigError(
            f"tiny prompt source {source!r}: tasks must be distinct names from {', '.join(known)}, got {parts[2]!r}"
        )
    path = tiny_world_dir().data("rl", parts[1])
    by_task: dict[str, list[PromptExample]] = {t: [] for t in tasks}
    for record in read_records(path):
        if record.fields.get("task") in by_task:
            by_task[record.fields["task"]].append(_prompt_example(record, prompt_key, answer_key))
    largest = max(len(rows) for rows in by_task.values())
    examples = [rows[i % len(rows)] for rows in by_task.values() for i in range(largest)]
    logger.info(
        "loaded %d prompts from %s (tasks %s, each repeated up to %d rows)",
        len(examples), path, ", ".join(f"{t}: {len(r)}" for t, r in by_task.items()), largest,
    )  # fmt: skip
    return examples


def _prompt_example(record: Record, prompt_key: str, answer_key: str | None) -> PromptExample:
    prompt = require_prompt(record, prompt_key)
    metadata = {k: v for k, v in record.fields.items() if k != prompt_key}
    if answer_key is not None:
        answer = require_field(
            record,
            answer_key,
            hint="choose the answer column with answer_key=<name>, or answer_key=None if the reward needs no reference answer",
        )
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(
                f"{record.where}: field {answer_key!r} must be a string or a number, got {type(answer).__name__}"
            )
        if isinstance(answer, str) and not answer.strip():
            raise DataError(
                f"{record.where}: field {answer_key!r} is empty; fill in the reference answer or remove the row"
            )
        metadata["answer"] = str(answer)
    return PromptExample(prompt, metadata, record.where)


def prompt_metadata(row: PromptExample) -> dict[str, Any]:
    """What travels with a prompt to the reward terms: the row's fields plus RAW_PROMPT."""
    return {**row.metadata, RAW_PROMPT: row.prompt}


def encode_prompts(
    rows: Sequence[PromptExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    use_chat_template: bool = True,
    truncation: Literal["error", "left", "right"] = "error",
) -> list[list[int]]:
    """Token ids of each prompt, rendered with the chat template or tokenized as plain text.

    A prompt longer than `max_prompt_length` tokens raises DataError (listing the first few
    offenders) unless `truncation` is "left" (keep the end, where the question usually is) or
    "right" (keep the beginning). Truncating a chat prompt can cut template tokens; prefer
    filtering such rows out of the dataset.
    """
    if truncation not in ("error", "left", "right"):
        raise ConfigError(f"truncation must be 'error', 'left' or 'right', got {truncation!r}")
    if max_prompt_length <= 0:
        raise ConfigError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if use_chat_template and not tokenizer.chat_template:
        raise ConfigError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "set use_chat_template=False for plain-text prompts, or use a tokenizer with one"
        )
    encoded = [_encode(row, tokenizer, use_chat_template) for row in rows]
    too_long = [(row, len(ids)) for row, ids in zip(rows, encoded) if len(ids) > max_prompt_length]
    if too_long and truncation == "error":
        first = "; ".join(f"{row.where or 'row'} has {n} tokens" for row, n in too_long[:3])
        raise DataError(
            f"{len(too_long)} prompt(s) exceed max_prompt_length={max_prompt_length} ({first}); raise "
            "max_prompt_length, shorten or drop these rows, or set truncation='left' or 'right'"
        )
    if too_long:
        logger.warning("truncating %d prompt(s) to %d tokens from the %s", len(too_long), max_prompt_length, truncation)
        keep = slice(-max_prompt_length, None) if truncation == "left" else slice(0, max_prompt_length)
        encoded = [ids[keep] if len(ids) > max_prompt_length else ids for ids in encoded]
    return encoded


def _encode(row: PromptExample, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> list[int]:
    if use_chat_template:
        return encode_chat_prompt(tokenizer, row.prompt)
    if not isinstance(row.prompt, str):
        raise DataError(f"{row.where}: the prompt is a list of chat messages; set use_chat_template=True to render it")
    return tokenizer(row.prompt)["input_ids"]
