"""The tiny world's grid split: a fifth of one task's operand grid held out, sharing structure with train."""

import pytest

from rlhf.data import tiny_world
from rlhf.data.tiny_world import (
    CARRY_SLIP,
    GRID_KINDS,
    Problem,
    carry_slip,
    check_answer,
    grid_file,
    grid_split,
    read_jsonl,
    slipped_sft_rows,
    split_problems,
)
from rlhf.errors import DataError


def operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def test_add_2d_grid_is_split_four_to_one_disjoint_and_complete():
    split = grid_split("add_2d", seed=0)
    train, held_out = split["train"], split["eval"]
    assert (len(train), len(held_out)) == (720, 180)  # 90 × 10 pairs, a fifth held out
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert {operands(p.prompt) for p in train + held_out} == {(a, b) for a in range(10, 100) for b in range(10)}
    for p in train + held_out:
        a, b = operands(p.prompt)
        assert p.task == "add_2d" and p.answer == str(a + b)


def test_every_held_out_problem_shares_its_parts_with_train_problems():
    """Held-out "47+5=" has train problems with the same units step (x7+5) and with the same tens digit (4x+b)."""
    split = grid_split("add_2d", seed=0)
    train = [operands(p.prompt) for p in split["train"]]
    units_steps = {(a % 10, b) for a, b in train}
    tens = {a // 10 for a, _ in train}
    for p in split["eval"]:
        a, b = operands(p.prompt)
        assert (a % 10, b) in units_steps and a // 10 in tens


def test_same_seed_same_split_other_seed_other_split_and_the_tiny_world_is_unchanged():
    before = split_problems(0)
    assert grid_split("add_2d", seed=0) == grid_split("add_2d", seed=0)
    assert grid_split("add_2d", seed=0)["eval"] != grid_split("add_2d", seed=1)["eval"]
    assert split_problems(0) == before
    assert len(grid_split("sub_1d")["eval"]) == 11  # round(55 / 5): any task's grid splits the same way


def test_unknown_task_kind_or_split_names_the_known_ones():
    with pytest.raises(DataError, match="add_2d"):
        grid_split("mul_2d")
    with pytest.raises(DataError, match="sft, sft_slip, rl"):
        grid_file("preference", "train")
    with pytest.raises(DataError, match="train, eval"):
        grid_file("rl", "test")


def test_grid_files_hold_sft_and_rl_rows_the_checker_accepts(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    split = grid_split("add_2d", seed=0)
    for kind in GRID_KINDS:
        for name in ("train", "eval"):
            path = grid_file(kind, name)
            assert path == tiny_world.tiny_world_dir().root / "extra" / f"grid_add_2d_{kind}_{name}.jsonl"
            rows = read_jsonl(path)
            assert [r["prompt"] for r in rows] == [p.prompt for p in split[name]]
            if kind == "sft":
                assert all(check_answer(r["response"], p.answer) for r, p in zip(rows, split[name]))
                assert rows[0]["messages"][1] == {"role": "assistant", "content": rows[0]["response"]}
            elif kind == "sft_slip":
                assert rows == slipped_sft_rows(split[name])
            else:
                assert all(r["answer"] == p.answer and r["task"] == "add_2d" for r, p in zip(rows, split[name]))
    assert grid_file("rl", "eval") == path  # written once, then reused


@pytest.mark.parametrize(
    "task, prompt, answer, slipped",
    [
        ("add_2d", "47+5=", "52", "42"),  # 7+5=12: the carry into the tens is forgotten
        ("add_2d", "47+3=", "50", "40"),
        ("add_2d", "47+2=", "49", None),  # no carry, nothing to forget
        ("sub_2d", "42-5=", "37", "47"),  # 2-5: the borrow from the tens is forgotten
        ("sub_2d", "47-5=", "42", None),
        ("add_1d", "7+5=", "12", None),  # one-digit tasks have no carry step
    ],
)
def test_carry_slip_hand_cases(task, prompt, answer, slipped):
    assert carry_slip(Problem(task, "hard", prompt, answer)) == slipped


def test_slipped_demonstrations_forget_the_carry_in_about_the_set_share_and_nothing_else():
    problems = grid_split("add_2d")["train"]
    rows = slipped_sft_rows(problems)
    assert rows == slipped_sft_rows(problems) and [r["prompt"] for r in rows] == [p.prompt for p in problems]
    carries = [(r, p) for r, p in zip(rows, problems) if carry_slip(p) is not None]
    assert len(carries) == 328  # of 720: units digit + b >= 10 in 45% of the grid
    slipped = [r for r, p in carries if r["response"] != p.answer]
    assert all(r["response"] == carry_slip(p) for r, p in carries if r["response"] != p.answer)
    assert abs(len(slipped) / len(carries) - CARRY_SLIP) < 0.05  # 198 of 328 with seed 0
    assert all(r["response"] == p.answer for r, p in zip(rows, problems) if carry_slip(p) is None)
