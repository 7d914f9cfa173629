"""Seed-prompt expansion's pure pieces (rlhf.data.expansion), against hand-computed values."""

from __future__ import annotations

import pytest

from rlhf.data.expansion import (
    ACCEPTED,
    EMPTY,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    UNPARSEABLE,
    DedupPool,
    check_template,
    choose_shots,
    fewshot_prompt,
    instruction_text,
    lcs_length,
    normalize,
    parse_instruction,
    rouge_l,
    words,
)
from rlhf.errors import ConfigError


def test_words_and_normalize_ignore_case_and_punctuation():
    assert words("Add 2+3!") == ["add", "2", "3"]
    assert normalize("  Write a POEM,\nplease. ") == "write a poem please"
    assert words("?! ...") == []


def test_lcs_and_rouge_l_by_hand():
    a, b = "a b c d".split(), "a c d b".split()
    assert lcs_length(a, b) == 3  # a c d
    assert rouge_l(a, b) == pytest.approx(0.75)  # P = R = 3/4
    # LCS 2: P = 2/3, R = 2/2, F = 2 × (2/3) × 1 / (2/3 + 1) = 0.8
    assert rouge_l(["the", "cat", "sat"], ["the", "cat"]) == pytest.approx(0.8)
    assert rouge_l(["x"], ["x"]) == 1.0
    assert rouge_l([], ["x"]) == 0.0 and rouge_l(["x"], ["y"]) == 0.0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)


def test_fewshot_prompt_numbers_the_shots_on_one_line_each():
    template = "Come up with tasks:\n{examples}\nTask {next}:"
    prompt = fewshot_prompt(template, ["write  a\npoem", "add 2+3"])
    assert prompt == "Come up with tasks:\nTask 1: write a poem\nTask 2: add 2+3\nTask 3:"


def test_template_errors():
    check_template("{examples} and a literal {{brace}} then Task {next}:")
    with pytest.raises(ConfigError, match="must contain \\{examples\\}"):
        check_template("Task {next}:")
    with pytest.raises(ConfigError, match="only \\{examples\\} and \\{next\\}"):
        check_template("{examples} {topic}")
    with pytest.raises(ConfigError, match="does not format"):
        check_template("{examples} {")


def test_instruction_text_of_text_and_chat_prompts():
    assert instruction_text("  reverse\tabc= ") == "reverse abc="
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi\nthere "}]
    assert instruction_text(chat) == "hi there"


def test_shots_are_distinct_seeded_and_per_attempt():
    first = choose_shots(10, 4, run_seed=1, attempt=7)
    assert first == choose_shots(10, 4, run_seed=1, attempt=7)
    assert len(set(first)) == 4 and all(0 <= i < 10 for i in first)
    draws = {tuple(choose_shots(10, 4, run_seed=1, attempt=a)) for a in range(20)}
    assert len(draws) > 10  # attempts see different seeds (210 possible 4-subsets in order: 5040)
    assert choose_shots(3, 3, run_seed=0, attempt=0) in (
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    )


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        (" Write a haiku.\nTask 5: more", "length", ("Write a haiku.", ACCEPTED)),  # the line ended: complete
        ("Task 4:  Sort the  list", "stop", ("Sort the list", ACCEPTED)),  # echoed marker stripped
        ("\nName three colors", "stop", ("Name three colors", ACCEPTED)),
        ("Write a very long", "length", (None, UNPARSEABLE)),  # cut off by max_new_tokens
        ("bad \ufffd byte", "stop", (None, UNPARSEABLE)),
        ("  ?!  ", "stop", (None, EMPTY)),
        ("", "stop", (None, EMPTY)),
        ("Task 3:", "stop", (None, EMPTY)),
    ],
)
def test_parse_instruction(text, finish_reason, expected):
    assert parse_instruction(text, finish_reason) == expected


def test_dedup_pool_exact_near_and_accepted():
    pool = DedupPool(threshold=0.7)
    pool.add("write a poem about the sea")
    exact = pool.check("Write a poem about the SEA!")
    assert (exact.reason, exact.similarity, exact.closest) == (EXACT_DUPLICATE, 1.0, 0)
    # LCS 5 of 6 and 6 words: F = 5/6 = 0.833 > 0.7
    near = pool.check("write a poem about the ocean")
    assert near.reason == NEAR_DUPLICATE and near.similarity == pytest.approx(5 / 6) and near.closest == 0
    # LCS (write, a, about) = 3 of 6 and 6: F = 0.5
    other = pool.check("write a story about a dragon")
    assert other.reason == ACCEPTED and other.similarity == pytest.approx(0.5) and other.closest == 0
    unrelated = pool.check("compute 2 plus 3")
    assert (unrelated.reason, unrelated.similarity, unrelated.closest) == (ACCEPTED, 0.0, None)


def test_dedup_pool_reports_the_closest_entry_and_keeps_ties_at_the_threshold():
    pool = DedupPool(threshold=0.5)
    pool.add("write a poem about the sea")
    assert pool.check("write a story about a dragon").reason == ACCEPTED  # F = 0.5 is not > 0.5
    pool.add("a story about a dragon")
    # vs entry 1: LCS 5 (a story about a dragon), P = 5/6, R = 5/5: F = 10/11
    verdict = pool.check("write a story about a dragon")
    assert verdict.reason == NEAR_DUPLICATE and verdict.similarity == pytest.approx(10 / 11) and verdict.closest == 1
    assert pool.texts == ["write a poem about the sea", "a story about a dragon"]
