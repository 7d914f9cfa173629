"""The carry world (the recipes' data): careless demonstrations, carry preference pairs, worked solutions, prompts."""

from pathlib import Path

from omegaconf import OmegaConf

from rlhf.data.tiny_world import (
    JUDGE_TEMPLATE,
    carry_mistake,
    carry_slip,
    check_answer,
    generate_rows,
    grid_split,
)

ROOT = Path(__file__).resolve().parents[3]


def test_preference_pairs_differ_exactly_in_the_carry_and_hold_out_the_grid_split():
    split = grid_split("add_2d")
    for name in ("train", "eval"):
        rows = generate_rows("preference", name)
        assert [r["prompt"] for r in rows] == [p.prompt for p in split[name]]
        for row, problem in zip(rows, split[name]):
            assert row["chosen"] == problem.answer and not check_answer(row["rejected"], problem.answer)
            # "47+5=": 52 over 42 (carry forgotten); "47+2=": 49 over 59 (a carry where none belongs)
            expected = int(problem.answer) - 10 if row["carry"] else int(problem.answer) + 10
            assert int(row["rejected"]) == expected and row["carry"] == (carry_slip(problem) is not None)
    assert {r["prompt"] for r in generate_rows("preference", "train")}.isdisjoint(
        r["prompt"] for r in generate_rows("preference", "eval")
    )
    no_carry = next(p for p in split["eval"] if carry_slip(p) is None)
    assert carry_mistake(no_carry) == str(int(no_carry.answer) + 10)


def test_careless_demonstrations_and_worked_solutions_forget_the_same_carries():
    for name in ("train", "eval"):
        plain, worked = generate_rows("carry_sft", name), generate_rows("carry_cot", name)
        assert [r["prompt"] for r in plain] == [r["prompt"] for r in worked]
        slipped = 0
        for short, cot in zip(plain, worked):
            assert cot["response"].endswith(f"#### {short['response']}")  # the CoT's final answer is the demo's
            slipped += not check_answer(short["response"], cot["answer"])
        carries = sum(r["carry"] for r in generate_rows("preference", name))
        assert 0.4 * carries < slipped < 0.8 * carries  # CARRY_SLIP = 0.6 of the problems that need a carry
    worked = {r["prompt"]: r for r in generate_rows("carry_cot", "train")}
    right = [r for r in worked.values() if check_answer(r["response"], r["answer"])]
    assert all(r["response"].split(" #### ")[0].split()[-1].endswith(f"={r['answer']}") for r in right)


def test_carry_prompts_load_by_name_with_reference_answers():
    from rlhf.data.prompts import load_prompt_dataset

    held_out = load_prompt_dataset("tiny:carry:eval")
    assert len(held_out) == 180 and {e.metadata["task"] for e in held_out} == {"add_2d"}
    assert [e.prompt for e in held_out] == [p.prompt for p in grid_split("add_2d")["eval"]]
    assert all(str(eval(e.prompt.rstrip("="))) == e.metadata["answer"] for e in held_out)


def test_rlaif_overlay_renders_the_judge_rubric_the_tiny_judge_was_trained_on():
    overlay = OmegaConf.load(ROOT / "conf" / "experiment" / "tiny_rlaif.yaml")
    assert overlay.reward.judge.template == JUDGE_TEMPLATE
    assert overlay.reward.judge.use_chat_template is False and overlay.reward.judge.model_path == "tiny-judge"
