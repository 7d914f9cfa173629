"""Offline examples: dataset rows turned into token ids with loss masks, validated row by row.

Formats (DataConfig.format; "auto" picks one from the fields of the first row, `resolve_format`):

  text         {"text": ...}                      PT: loss on every token
  instruction  {"prompt": ..., "response": ...}   SFT: loss on the response (+ eos)
  messages     {"messages": [...]}                SFT: loss on every assistant turn
  preference   {"prompt", "chosen", "rejected"}   RM/DPO: chosen/rejected are texts, or message
               lists ending with the assistant turn (the prompt is then optional: the turns
               before the last one are the prompt, and must be the same in both)
  kto          {"prompt", "response", "label"}    KTO: one response and whether it is desirable

With `use_chat_template` and a tokenizer that has a template, a prompt is rendered with the
generation prompt, and a response is what rendering the whole conversation adds after it (its
content, the end-of-turn token and whatever the template appends). The prompt and each turn are
tokenized separately, so token boundaries match what the policy sees at generation. Without a
template, prompts are tokenized as plain text (with the tokenizer's special tokens, as RL
prompts are) and responses get an eos appended.

Every check raises DataError naming the row's location, the field, what is wrong and what to
change. Examples longer than `max_length` (prompt + response tokens) are truncated (the
response is cut on the right, keeping at least one token; otherwise the row is dropped) or
dropped, per `overlong`; both are counted and logged once per dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from rlhf.data.formats import Messages, require_field, require_messages, require_prompt, require_text
from rlhf.data.sources import Record
from rlhf.data.tokenizer import as_messages
from rlhf.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import DataConfig

logger = logging.getLogger(__name__)

FORMATS = ("text", "instruction", "messages", "preference", "kto")
OVERLONG = ("truncate", "drop")
LOSS_ON = ("response", "all")
COMPLETION_KEY = "completion"
"""TRL's name for the response column of prompt/completion and KTO datasets, read when the
configured response_key is missing from a row."""

_TRUE = ("true", "1", "yes", "desirable")
_FALSE = ("false", "0", "no", "undesirable")


@dataclass(frozen=True)
class SequenceExample:
    """PT/SFT: prompt tokens, response tokens, and which response tokens carry a loss.

    loss_mask has one entry per response token. The first token of the sequence never carries
    a loss (nothing predicts it), which is why PT and loss_on="all" put exactly one token in
    the prompt.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class PairExample:
    """RM/DPO: one prompt, the preferred and the dispreferred response, and an optional margin."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    where: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class KTOExample:
    """KTO: one prompt, one response, and whether the response is desirable."""

    prompt_ids: list[int]
    response_ids: list[int]
    desirable: bool
    where: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


Example = Union[SequenceExample, PairExample, KTOExample]


@dataclass
class EncodeStats:
    """What encoding did to a dataset: rows read, truncated, dropped (too long), tokens kept."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    split: int = 0
    """Plain-text documents longer than max_length cut into several blocks (PT keeps every token)."""
    tokens: int = 0
    dropped_where: list[str] = field(default_factory=list)  # the first few, for the log


@dataclass
class EncodedDataset:
    """The examples of one dataset, all of one `kind`, and the encoding statistics."""

    kind: str
    examples: list[Any]
    stats: EncodeStats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        return self.examples[index]


def check_format(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"data.{name}={value!r} is not one of {', '.join(allowed)}")


def resolve_format(record: Record, data_cfg: DataConfig) -> str:
    """The format a row's fields imply (for format="auto"), checked in the order of the docstring's
    table from the most specific: preference, kto, instruction, messages, text."""
    fields = record.fields
    if data_cfg.chosen_key in fields and data_cfg.rejected_key in fields:
        return "preference"
    if data_cfg.label_key in fields:
        return "kto"
    if data_cfg.prompt_key in fields and (data_cfg.response_key in fields or COMPLETION_KEY in fields):
        return "instruction"
    if data_cfg.messages_key in fields:
        return "messages"
    if data_cfg.text_key in fields:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the data format from the fields {', '.join(sorted(fields)) or '(none)'}; "
        f"expected {data_cfg.text_key!r} (text), {data_cfg.prompt_key!r} + {data_cfg.response_key!r} (instruction), "
        f"{data_cfg.messages_key!r} (messages), {data_cfg.chosen_key!r} + {data_cfg.rejected_key!r} (preference) or "
        f"{data_cfg.prompt_key!r} + {data_cfg.response_key!r} + {data_cfg.label_key!r} (kto). Set data.format, "
        "or name the columns with data.<format>_key=<column>"
    )


def encode_dataset(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    kind: str,
    *,
    name: str = "train",
) -> EncodedDataset:
    """Validate and tokenize every row as `kind` (a FORMATS entry, or "auto": from the first row's fields).

    Args:
        records: rows with their locations (rlhf.data.datasets.load_records).
        tokenizer: the policy's tokenizer.
        data_cfg: a DataConfig (keys, use_chat_template, max_length, overlong, loss_on).
        kind: the row format.
        name: what the log line calls the dataset ("train", "eval").

    Raises:
        DataError: a row is malformed (naming row, field and fix), or every row was dropped.
        ConfigError: an unknown kind, overlong or loss_on value.
    """
    check_format("format", kind, (*FORMATS, "auto"))
    check_format("overlong", data_cfg.overlong, OVERLONG)
    check_format("loss_on", data_cfg.loss_on, LOSS_ON)
    if data_cfg.max_length < 2:
        raise ConfigError(
            f"data.max_length must be >= 2 (a prompt token and a response token), got {data_cfg.max_length}"
        )
    if not records:
        raise DataError(f"the {name} dataset has no rows")
    if kind == "auto":
        kind = resolve_format(records[0], data_cfg)
    encoder = _Encoder(tokenizer, data_cfg, needs_chat=kind == "messages")
    encode_row = {
        "text": encoder.text,
        "instruction": encoder.instruction,
        "messages": encoder.messages,
        "preference": encoder.preference,
        "kto": encoder.kto,
    }[kind]
    stats = EncodeStats()
    examples = []
    for record in records:
        stats.rows += 1
        example = encode_row(record)
        if kind == "text" and len(example) > data_cfg.max_length:
            blocks = split_text(example, data_cfg.max_length)
            stats.split += 1
            stats.tokens += sum(len(b) for b in blocks)
            examples.extend(blocks)
            continue
        fitted = _fit(example, data_cfg.max_length, data_cfg.overlong)
        if fitted is None:
            stats.dropped += 1
            if len(stats.dropped_where) < 3:
                stats.dropped_where.append(f"{record.where} ({len(example)} tokens)")
            continue
        stats.truncated += fitted is not example
        stats.tokens += _token_count(fitted)
        examples.append(fitted)
    _log_stats(name, kind, stats, data_cfg)
    if not examples:
        raise DataError(
            f"every row of the {name} dataset ({stats.rows}) is longer than data.max_length={data_cfg.max_length} "
            f"tokens (e.g. {', '.join(stats.dropped_where)}); raise data.max_length"
            + (" or set data.overlong=truncate" if data_cfg.overlong == "drop" else "")
        )
    return EncodedDataset(kind, examples, stats)


def encode_answers(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[tuple[str | Messages, str]], *, where: str
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each (prompt, answer text) as the offline stages encode a row's answer.

    With the tokenizer's chat template (when it has one) the whole conversation is rendered and the
    prompt and the answer are tokenized apart; without one the prompt is plain text and the answer
    gets an eos. rlhf.rewards.pipeline encodes the policy's samples this way for a reward model whose
    tokenizer differs from the policy's, so the model sees them as stage=rm showed it its pairs.
    `where` names the inputs in errors.
    """
    from rlhf.config import DataConfig

    encoder = _Encoder(tokenizer, DataConfig(use_chat_template=bool(tokenizer.chat_template)), needs_chat=False)
    return [encoder._turn(Record({}, f"{where} {i}"), prompt, answer) for i, (prompt, answer) in enumerate(turns)]


def _log_stats(name: str, kind: str, stats: EncodeStats, data_cfg: DataConfig) -> None:
    logger.info(
        "encoded %s data (format %s): %d rows, %d kept, %d truncated, %d dropped (max_length=%d, overlong=%s), "
        "%d long documents split into blocks, %d tokens",
        name, kind, stats.rows, stats.rows - stats.dropped, stats.truncated, stats.dropped,
        data_cfg.max_length, data_cfg.overlong, stats.split, stats.tokens,
    )  # fmt: skip
    if stats.dropped:
        logger.warning(
            "dropped %d %s row(s) longer than data.max_length=%d, e.g. %s",
            stats.dropped, name, data_cfg.max_length, "; ".join(stats.dropped_where),
        )  # fmt: skip


def _token_count(example: Example) -> int:
    if isinstance(example, PairExample):
        return len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)
    return len(example)


# ---------------------------------------------------------------------------------------------
# Length limits


def split_text(example: SequenceExample, max_length: int) -> list[SequenceExample]:
    """A long plain-text document as consecutive blocks of max_length tokens (the last may be shorter).

    As in causal-LM pre-training on concatenated text (HF run_clm's group_texts), the first token of
    each block is its context only; a trailing block of a single token is dropped.
    """
    ids = example.prompt_ids + example.response_ids
    blocks = []
    for start in range(0, len(ids), max_length):
        block = ids[start : start + max_length]
        if len(block) >= 2:
            where = f"{example.where} (block {len(blocks) + 1})"
            blocks.append(SequenceExample(block[:1], block[1:], [1] * (len(block) - 1), where))
    return blocks


def _fit(example: Example, max_length: int, overlong: str) -> Example | None:
    """The example itself when it fits, a truncated copy, or None (dropped)."""
    if len(example) <= max_length:
        return example
    room = max_length - len(example.prompt_ids)
    if overlong == "drop" or room < 1:
        return None
    if isinstance(example, SequenceExample):
        return SequenceExample(example.prompt_ids, example.response_ids[:room], example.loss_mask[:room], example.where)
    if isinstance(example, KTOExample):
        return KTOExample(example.prompt_ids, example.response_ids[:room], example.desirable, example.where)
    chosen, rejected = example.chosen_ids[:room], example.rejected_ids[:room]
    if chosen == rejected:  # they differed only beyond the limit: nothing left to compare
        return None
    return PairExample(example.prompt_ids, chosen, rejected, example.margin, example.where)


# ---------------------------------------------------------------------------------------------
# Encoders, one method per format


class _Encoder:
    """Tokenizes rows of each format with one tokenizer and one set of column names."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, *, needs_chat: bool):
        self.tokenizer = tokenizer
        self.cfg = data_cfg
        self.chat = bool(data_cfg.use_chat_template and tokenizer.chat_template)
        name = getattr(tokenizer, "name_or_path", "")
        if needs_chat and not self.chat:
            raise ConfigError(
                f"messages-format data needs a chat template, but data.use_chat_template={data_cfg.use_chat_template} "
                f"and the tokenizer {name!r} {'has' if tokenizer.chat_template else 'has no'} template; set "
                "data.use_chat_template=true with a tokenizer that has one, or use instruction-format rows"
            )
        if data_cfg.use_chat_template and not self.chat:
            logger.warning("tokenizer %r has no chat template: encoding prompts and responses as plain text", name)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer {name!r} has no eos token; responses need one to end")
        self.eos = tokenizer.eos_token_id

    # -- formats ----------------------------------------------------------------------------

    def text(self, record: Record) -> SequenceExample:
        text = require_text(record, self.cfg.text_key)
        ids = self.tokenizer(text)["input_ids"] + [self.eos]
        return SequenceExample(ids[:1], ids[1:], [1] * (len(ids) - 1), record.where)

    def instruction(self, record: Record) -> SequenceExample:
        prompt = require_prompt(record, self.cfg.prompt_key)
        prompt, content = self._prompt_and_answer(record, prompt, self._response_key(record), "response_key")
        prompt_ids, response_ids = self._turn(record, prompt, content)
        return self._sequence(prompt_ids, response_ids, [1] * len(response_ids), record.where)

    def messages(self, record: Record) -> SequenceExample:
        key = self.cfg.messages_key
        messages = require_messages(record, key)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise DataError(
                f"{record.where}: field {key!r} has no assistant message; SFT learns the assistant turns, "
                "so add one or remove the row"
            )
        if assistant[0] == 0:
            raise DataError(
                f"{record.where}: field {key!r} starts with an assistant message; put the user (or system) "
                "turn it answers before it"
            )
        for i in assistant:
            if not messages[i]["content"].strip():
                raise DataError(f"{record.where}: field {key!r}, message {i} (assistant) is empty; fill it in")
        # Cut the rendered conversation where each assistant turn starts and ends, tokenize the
        # pieces separately, and mark the assistant pieces.
        full = self._render(record, messages, generation_prompt=False)
        cuts = [0]
        for i in assistant:
            cuts += [
                self._prefix_length(record, full, messages[:i], True),
                self._prefix_length(record, full, messages[: i + 1], False),
            ]
        cuts.append(len(full))
        if cuts != sorted(cuts):
            raise DataError(
                f"{record.where}: the chat template does not render the turns of field {key!r} in order, so "
                "assistant tokens cannot be located; use instruction-format rows or another template"
            )
        prompt_ids = self._tokens(full[: cuts[1]])
        response_ids: list[int] = []
        loss_mask: list[int] = []
        for piece, (start, end) in enumerate(zip(cuts[1:], cuts[2:])):
            ids = self._tokens(full[start:end])
            response_ids += ids
            loss_mask += [1 if piece % 2 == 0 else 0] * len(ids)  # pieces alternate assistant / other
        return self._sequence(prompt_ids, response_ids, loss_mask, record.where)

    def preference(self, record: Record) -> PairExample:
        ckey, rkey = self.cfg.chosen_key, self.cfg.rejected_key
        chosen, rejected = require_field(record, ckey), require_field(record, rkey)
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(
                f"{record.where}: fields {ckey!r} and {rkey!r} must both be texts or both be message lists, got "
                f"{type(chosen).__name__} and {type(rejected).__name__}"
            )
        if isinstance(chosen, list) and self.cfg.prompt_key not in record.fields:
            prompt: str | Messages | None = None  # implicit prompt: the turns before the last
        else:
            prompt = require_prompt(record, self.cfg.prompt_key)
        prompt_c, chosen_text = self._prompt_and_answer(record, prompt, ckey, "chosen_key")
        prompt_r, rejected_text = self._prompt_and_answer(record, prompt, rkey, "rejected_key")
        if as_messages(prompt_c) != as_messages(prompt_r):
            raise DataError(
                f"{record.where}: fields {ckey!r} and {rkey!r} continue different conversations; the turns "
                "before the last assistant message must be the same in both"
            )
        if chosen_text == rejected_text:
            raise DataError(
                f"{record.where}: fields {ckey!r} and {rkey!r} are identical; a preference pair needs two "
                "different responses (fix or remove the row)"
            )
        prompt_ids, chosen_ids = self._turn(record, prompt_c, chosen_text)
        _, rejected_ids = self._turn(record, prompt_r, rejected_text)
        return PairExample(prompt_ids, chosen_ids, rejected_ids, self._margin(record), record.where)

    def kto(self, record: Record) -> KTOExample:
        prompt = require_prompt(record, self.cfg.prompt_key)
        prompt, content = self._prompt_and_answer(record, prompt, self._response_key(record), "response_key")
        desirable = self._label(record)
        prompt_ids, response_ids = self._turn(record, prompt, content)
        return KTOExample(prompt_ids, response_ids, desirable, record.where)

    # -- fields -----------------------------------------------------------------------------

    def _response_key(self, record: Record) -> str:
        key = self.cfg.response_key
        if key not in record.fields and COMPLETION_KEY in record.fields:
            return COMPLETION_KEY
        return key

    def _prompt_and_answer(
        self, record: Record, prompt: str | Messages | None, key: str, setting: str
    ) -> tuple[str | Messages, str]:
        """(prompt, assistant content) of a response field holding a text or messages ending with the assistant.

        `prompt` is None only for preference rows whose responses are message lists (implicit prompt).
        """
        value = require_field(record, key, hint=f"choose the column with data.{setting}=<name>")
        if not isinstance(value, list):
            assert prompt is not None
            return prompt, require_text(record, key)
        messages = require_messages(record, key)
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{record.where}: field {key!r} must end with the assistant message it scores, but its last "
                f"message has role {messages[-1]['role']!r}"
            )
        if not messages[-1]["content"].strip():
            raise DataError(f"{record.where}: field {key!r}: the last (assistant) message is empty; fill it in")
        context = (as_messages(prompt) if prompt is not None else []) + messages[:-1]
        if not context:
            raise DataError(
                f"{record.where}: field {key!r} holds only the assistant message and the row has no "
                f"{self.cfg.prompt_key!r}; add the prompt column or the user turn before the answer"
            )
        return context, messages[-1]["content"]

    def _label(self, record: Record) -> bool:
        key = self.cfg.label_key
        value = require_field(record, key, hint="choose the column with data.label_key=<name>")
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise DataError(
            f"{record.where}: field {key!r} must say whether the response is desirable: true/false, 1/0 or "
            f'"yes"/"no", got {value!r}'
        )

    def _margin(self, record: Record) -> float:
        value = record.fields.get(self.cfg.margin_key)
        if value is None:
            return 0.0
        if not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        raise DataError(
            f"{record.where}: field {self.cfg.margin_key!r} must be a number (the preference margin), got {value!r}"
        )

    # -- tokens -----------------------------------------------------------------------------

    def _sequence(self, prompt_ids: list[int], response_ids: list[int], loss_mask: list[int], where: str):
        if self.cfg.loss_on == "all":
            ids = prompt_ids + response_ids
            return SequenceExample(ids[:1], ids[1:], [1] * (len(ids) - 1), where)
        return SequenceExample(prompt_ids, response_ids, loss_mask, where)

    def _turn(self, record: Record, prompt: str | Messages, content: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of the assistant's answer `content` to it."""
        if not self.chat:
            if not isinstance(prompt, str):
                raise DataError(
                    f"{record.where}: the prompt is a list of chat messages; set data.use_chat_template=true "
                    "and use a tokenizer with a chat template to render it"
                )
            return self.tokenizer(prompt)["input_ids"], self._tokens(content) + [self.eos]
        messages = as_messages(prompt)
        full = self._render(record, [*messages, {"role": "assistant", "content": content}], generation_prompt=False)
        start = self._prefix_length(record, full, messages, True)
        return self._tokens(full[:start]), self._tokens(full[start:])

    def _render(self, record: Record, messages: Messages, *, generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as e:  # jinja raises TemplateError for roles/layouts a template refuses
            raise DataError(f"{record.where}: the chat template cannot render this row: {e}") from e
        assert isinstance(text, str)
        return text

    def _prefix_length(self, record: Record, full: str, messages: Messages, generation_prompt: bool) -> int:
        """Length of the rendering of `messages`, which must begin the rendering `full` of the conversation."""
        prefix = self._render(record, messages, generation_prompt=generation_prompt)
        if not full.startswith(prefix):
            raise DataError(
                f"{record.where}: the chat template renders the first {len(messages)} message(s) differently "
                "inside the whole conversation (it rewrites earlier turns), so response tokens cannot be located; "
                "use single-turn rows or a template that renders turns append-only"
            )
        return len(prefix)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
