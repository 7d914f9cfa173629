"""A small tokenizer trained offline on the tiny-world corpus, and chat-template helpers.

The tiny world (rlhf.data.tiny_world) needs a tokenizer without a model hub: this one is a
byte-level BPE trained in well under a second with the `tokenizers` library and saved as an
ordinary Hugging Face tokenizer directory, so every consumer (transformers, vLLM, our data
pipeline) loads it with `AutoTokenizer.from_pretrained(dir)` like any real checkpoint's.

Properties the tests and the tiny models rely on:
  - every letter and every digit is its own token (no merge contains one), so answers tokenize
    the same wherever they appear and "reverse abc" is a per-token task;
  - byte-level, so any text encodes (no unknown token) and decodes back exactly;
  - fewer than 512 tokens;
  - special tokens: pad, bos, eos (which also ends every chat turn) and one marker per chat role;
  - a chat template where rendering the prompt with `add_generation_prompt=True`, then the
    assistant's content, then eos, gives exactly the rendering of the whole conversation. So
    response tokens can be found by length, and a generation that stops at eos is a full turn.
  - no special token is added by plain `tokenizer(text)`: BOS comes only from the chat template
    (the Qwen convention), so a prompt never gets two of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # transformers is imported where a tokenizer is made: the config checks reading this module load none
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values())

# <|bos|><|user|>\n3+4=<|end|><|assistant|>\n7<|end|>
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the tiny chat template knows the roles system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 320


def train_tiny_tokenizer(texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a Hugging Face fast tokenizer.

    Deterministic for the same texts: the BPE trainer breaks count ties by token order.
    `vocab_size` counts the 256 byte tokens and the special tokens, so it must stay above 262
    to learn any merge; it is capped below 512 to keep the tiny models' embeddings small.
    """
    from transformers import PreTrainedTokenizerFast

    if not 256 + len(SPECIAL_TOKENS) <= vocab_size < 512:
        raise ValueError(f"vocab_size must be in [{256 + len(SPECIAL_TOKENS)}, 512), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    # Each letter and digit is a pre-token of its own, so no merge contains one: arithmetic and
    # string tasks see one token per character. Merges only join runs of spaces and punctuation.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}\p{N}]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    logger.debug("trained tiny tokenizer with %d tokens", len(tokenizer))
    return tokenizer


def save_tiny_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Save as a normal tokenizer directory (tokenizer.json, tokenizer_config.json with the template)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path


def as_messages(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A plain-text prompt becomes one user turn; a message list is returned as a list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def render_chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[dict[str, Any]]) -> str:
    """The prompt as text, rendered with the tokenizer's chat template, ready for the assistant's turn."""
    rendered = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    assert isinstance(rendered, str)
    return rendered


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of the rendered chat prompt (special tokens come from the template, none are added)."""
    return tokenizer(render_chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


PROBE_TEXT = "Hello, World! 12+34=46 \t naïve café — 数学 🙂\n  end"
"""Text encoded by both tokenizers in `tokenizer_differences`: letters, digits, punctuation, spaces,
non-ASCII, so normalisers, pre-tokenisers and added BOS/EOS that differ show up in the ids."""


def tokenizer_differences(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> list[str]:
    """What differs between two tokenizers in ways that change token ids or their meaning; [] when
    token ids of one mean the same text to the other (vocabulary, special tokens, chat template, and
    the ids of PROBE_TEXT, which catch normalisation and added special tokens)."""
    differences = []
    if a.get_vocab() != b.get_vocab():
        differences.append(f"vocabulary ({len(a)} vs {len(b)} tokens)")
    if _special_tokens(a) != _special_tokens(b):
        differences.append("special tokens")
    if (a.chat_template or None) != (b.chat_template or None):
        differences.append("chat template")
    if a(PROBE_TEXT)["input_ids"] != b(PROBE_TEXT)["input_ids"]:
        differences.append("encoding of a probe text")
    return differences


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple:
    named = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return tuple(sorted(named.items())), tuple(sorted(tokenizer.all_special_tokens))


_MODEL_TURN = "ASSISTANTTURN7c1e"
_OBSERVATION = "TOOLOUTPUT3b9d"


def tool_turn_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text the chat template writes after a model turn to hand it a tool's output and give the turn back, with
    "{observation}" in place of the output: for a Qwen-style template
    "<|im_end|>\\n<|im_start|>tool\\n{observation}<|im_end|>\\n<|im_start|>assistant\\n".

    Read off the template itself: a conversation (user, assistant) rendered with and without a following "tool"
    message and the generation prompt; what follows the assistant's content in the longer rendering is the
    template. None when the tokenizer has no chat template or it cannot render a tool message (it raises, drops the
    message, or renders the assistant's turn differently once one follows).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": _MODEL_TURN}]
    try:
        rendered = tokenizer.apply_chat_template(
            [*conversation, {"role": "tool", "content": _OBSERVATION}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template without a tool role raises whatever its author chose
        return None
    if not isinstance(rendered, str) or rendered.count(_MODEL_TURN) != 1:
        return None
    after = rendered[rendered.index(_MODEL_TURN) + len(_MODEL_TURN) :]
    if after.count(_OBSERVATION) != 1:
        return None
    return after.replace(_OBSERVATION, "{observation}")
