"""Seed-prompt expansion, the pure parts: few-shot prompts, parsing the model's instruction, dedup.

Self-Instruct (Wang et al. 2022, arXiv:2212.10560 §2.2): show the model k instructions drawn from
the seed pool, numbered "Task 1: ... Task k:", and let it write "Task k+1"; keep the new
instruction only when its ROUGE-L similarity to every instruction already in the pool (seeds and
kept ones) is at most 0.7, then add it to the pool. The paper also samples some shots from the
machine-written pool; we show seeds only, so a row's provenance is a list of seed indices.

ROUGE-L here is the F1 of the longest common subsequence of word tokens (lower-cased runs of
letters and digits, as the `rouge_score` package's default tokenizer splits), implemented below.
The rollout engines and files live in rlhf.trainers.expand.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from rlhf.errors import ConfigError

EXAMPLE_LINE = "Task {index}: {instruction}"
"""How each shown seed is rendered inside the template's {examples} (numbered from 1)."""
TASK_PREFIX = re.compile(r"^\s*task\s*\d+\s*[:.]\s*", re.IGNORECASE)
"""A "Task 9:" the model may echo before its instruction (stripped when parsing)."""
WORD = re.compile(r"[a-z0-9]+")

ACCEPTED = "accepted"
EMPTY = "empty"
UNPARSEABLE = "unparseable"
TOO_LONG = "too_long"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REJECT_REASONS = (EMPTY, UNPARSEABLE, TOO_LONG, EXACT_DUPLICATE, NEAR_DUPLICATE)
"""Why a candidate is dropped, in the order the checks run."""


# ---------------------------------------------------------------------------------------- prompts


def collapse_whitespace(text: str) -> str:
    """One line, single spaces (Self-Instruct's encode_prompt does the same to every shown instruction)."""
    return " ".join(text.split())


def instruction_text(prompt: str | list[dict[str, Any]]) -> str:
    """A seed's instruction: the text itself, or the content of a chat prompt's last user turn."""
    if isinstance(prompt, str):
        return collapse_whitespace(prompt)
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return collapse_whitespace(str(users[-1])) if users else ""


def check_template(template: str) -> None:
    """A template fills {examples} (the numbered shots) and may use {next} (k + 1); nothing else."""
    if "{examples}" not in template:
        raise ConfigError("generate.expand.template must contain {examples}, where the numbered seed tasks go")
    try:
        template.format(examples="", next=1)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"generate.expand.template {template!r} does not format ({type(err).__name__}: {err}); it may use only "
            "{examples} and {next}; write a literal brace as {{ or }}"
        ) from None


def fewshot_prompt(template: str, examples: list[str]) -> str:
    """The template with the examples numbered "Task 1: ...", one per line, and {next} = len(examples) + 1."""
    lines = [EXAMPLE_LINE.format(index=i + 1, instruction=collapse_whitespace(e)) for i, e in enumerate(examples)]
    return template.format(examples="\n".join(lines), next=len(examples) + 1)


def choose_shots(num_seeds: int, shots: int, run_seed: int, attempt: int) -> list[int]:
    """`shots` distinct seed indices for attempt `attempt`, a pure function of (run_seed, attempt)."""
    rng = random.Random(f"expand:{run_seed}:{attempt}")  # str seeds hash with sha512: stable across processes
    return rng.sample(range(num_seeds), shots)


# ---------------------------------------------------------------------------------------- parsing


def parse_instruction(text: str, finish_reason: str) -> tuple[Optional[str], str]:
    """(the new instruction, ACCEPTED) or (None, why not) from one sampled continuation.

    The instruction is the first line, an echoed "Task N:" removed, whitespace collapsed. It is
    UNPARSEABLE when the model ran out of tokens before ending that line (finish_reason "length"
    and no newline: we cannot know where it ends) or wrote an undecodable byte (U+FFFD), and EMPTY
    when it has no word (a run of letters or digits) to compare with others.
    """
    line, newline, _ = text.lstrip("\n").partition("\n")
    if (finish_reason == "length" and not newline) or "\ufffd" in line:
        return None, UNPARSEABLE
    instruction = collapse_whitespace(TASK_PREFIX.sub("", line, count=1))
    if not words(instruction):
        return None, EMPTY
    return instruction, ACCEPTED


# ---------------------------------------------------------------------------------------- similarity


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits ("Add 2+3!" -> ["add", "2", "3"])."""
    return WORD.findall(text.lower())


def normalize(text: str) -> str:
    """The exact-duplicate key: the words joined by single spaces (case and punctuation ignored)."""
    return " ".join(words(text))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) × len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 = 2PR / (P + R), P = LCS / len(candidate), R = LCS / len(reference); 0 if either is empty."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Verdict:
    """What the pool says about one candidate."""

    reason: str
    """ACCEPTED, EXACT_DUPLICATE or NEAR_DUPLICATE."""
    similarity: float
    """Highest ROUGE-L F1 against the pool (1.0 for an exact duplicate, 0.0 when nothing shares a word)."""
    closest: Optional[int]
    """Index into the pool of the most similar entry (None when no entry shares a word with the candidate)."""


@dataclass
class DedupPool:
    """Instructions seen so far (seeds first, then accepted ones); candidates are checked against all of them."""

    threshold: float
    """A candidate whose ROUGE-L F1 with any entry exceeds this is a near duplicate (Self-Instruct: 0.7)."""
    texts: list[str] = field(default_factory=list)
    _tokens: list[list[str]] = field(default_factory=list)
    _counts: list[Counter] = field(default_factory=list)
    _exact: dict[str, int] = field(default_factory=dict)

    def add(self, text: str) -> None:
        tokens = words(text)
        self._exact.setdefault(" ".join(tokens), len(self.texts))
        self.texts.append(text)
        self._tokens.append(tokens)
        self._counts.append(Counter(tokens))

    def check(self, text: str) -> Verdict:
        """Exact duplicate (same words) of an entry, near duplicate (ROUGE-L F1 > threshold), or accepted."""
        tokens = words(text)
        exact = self._exact.get(" ".join(tokens))
        if exact is not None:
            return Verdict(EXACT_DUPLICATE, 1.0, exact)
        counts, best, closest = Counter(tokens), 0.0, None
        for i, (other, other_counts) in enumerate(zip(self._tokens, self._counts)):
            # LCS <= the multiset overlap, so F1 <= 2 × overlap / (n + m): skip the DP when that cannot win
            overlap = sum((counts & other_counts).values())
            if overlap == 0 or 2 * overlap / (len(tokens) + len(other)) <= best:
                continue
            score = rouge_l(tokens, other)
            if score > best:
                best, closest = score, i
        return Verdict(NEAR_DUPLICATE if best > self.threshold else ACCEPTED, best, closest)
