"""The tool world (3-digit × 2-digit products): its split, its demonstrations, whose calls the calculator tool
answers with the reference, and its files."""

from __future__ import annotations

import pytest

from rlhf.data import tiny_world
from rlhf.data.tiny_world import (
    TOOL_DEMO_SHARE,
    TOOL_EVAL,
    TOOL_KINDS,
    TOOL_TRAIN,
    check_answer,
    read_jsonl,
    tool_file,
    tool_problems,
    tool_sft_rows,
)
from rlhf.environments import CalculatorEnv
from rlhf.errors import DataError


def test_products_split_disjoint_with_correct_answers():
    split = tool_problems(seed=0)
    assert (len(split["train"]), len(split["eval"])) == (TOOL_TRAIN, TOOL_EVAL)
    assert not {p.prompt for p in split["train"]} & {p.prompt for p in split["eval"]}
    for p in split["train"][:50] + split["eval"][:50]:
        a, b = (int(x) for x in p.prompt.rstrip("=").split("*"))
        assert 100 <= a <= 999 and 10 <= b <= 99 and p.answer == str(a * b)
    assert tool_problems(seed=0) == split and tool_problems(seed=1) != split


def test_tool_demonstrations_call_the_calculator_in_about_the_set_share_and_it_answers_them():
    problems = tool_problems()["train"]
    rows = tool_sft_rows(problems)
    calls = [r for r in rows if r["response"].startswith("<calc>")]
    assert abs(len(calls) / len(rows) - TOOL_DEMO_SHARE) < 0.05
    env = CalculatorEnv()
    for row in calls[:100]:
        call, _, value = row["response"].partition("</calc>")
        assert env.step(call + "</calc>").observation == value == row["answer"]  # the tool gives exactly this
        assert check_answer(row["response"], row["answer"])  # and the rule reward reads the last number
    assert all(r["response"] == r["answer"] for r in rows if r not in calls)
    assert all(r["response"] == r["answer"] for r in tool_sft_rows(problems, tool_share=0.0))


def test_tool_files_are_written_once(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    for kind in TOOL_KINDS:
        path = tool_file(kind, "eval")
        assert path == tiny_world.tiny_world_dir().root / "extra" / f"tool_mul_3x2_{kind}_eval.jsonl"
        rows = read_jsonl(path)
        assert [r["prompt"] for r in rows] == [p.prompt for p in tool_problems()["eval"]]
    assert tool_file("rl", "eval") == path
    with pytest.raises(DataError, match="kinds: sft_tool, sft_plain, rl"):
        tool_file("sft", "train")


def test_tool_world_names_for_the_command_line():
    """data.train=tiny:tool_sft:train / tiny:tool_plain:train (SFT) and tiny:tool:<split> (RL prompts)."""
    from rlhf.data.datasets import load_records
    from rlhf.data.prompts import load_prompt_dataset

    demos = [r.fields for r in load_records("tiny:tool_sft:train")]
    plain = [r.fields for r in load_records("tiny:tool_plain:eval")]
    assert len(demos) == TOOL_TRAIN and any("<calc>" in r["response"] for r in demos)
    assert len(plain) == TOOL_EVAL and not any("<calc>" in r["response"] for r in plain)
    prompts = load_prompt_dataset("tiny:tool:eval", prompt_key="prompt", answer_key="answer")
    assert len(prompts) == TOOL_EVAL and prompts[0].metadata["task"] == tiny_world.TOOL_TASK
