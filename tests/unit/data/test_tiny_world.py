"""The tiny world: determinism, disjoint splits, answer checking, row formats, the on-disk cache."""

import json

import pytest

from rlhf.data import tiny_world
from rlhf.data.tiny_world import (
    DATA_KINDS,
    TASKS,
    Problem,
    check_answer,
    extract_answer,
    generate_rows,
    materialize_tiny_world,
    read_jsonl,
    split_problems,
    tiny_world_hash,
    wrong_answer,
)
from rlhf.errors import DataError


def test_same_seed_same_problems_other_seed_other_split():
    assert split_problems(0) == split_problems(0)
    assert split_problems(0)["eval"] != split_problems(1)["eval"]
    for kind in DATA_KINDS:
        assert generate_rows(kind, "train", seed=3) == generate_rows(kind, "train", seed=3)


def test_eval_prompts_never_appear_in_train():
    splits = split_problems(0)
    train = {p.prompt for p in splits["train"]}
    evals = {p.prompt for p in splits["eval"]}
    assert evals and not train & evals
    # ...nor in the pre-training text, where "3+4=7" would leak the answer.
    corpus = "\n".join(row["text"] for row in generate_rows("pretrain", "train"))
    lines = set(corpus.splitlines())
    assert not {p.prompt + p.answer for p in splits["eval"]} & lines


def test_every_task_is_in_both_splits_with_correct_answers():
    splits = split_problems(0)
    for split in ("train", "eval"):
        assert {p.task for p in splits[split]} == {t.name for t in TASKS}
    # Hand-checked instances of each generator's rule.
    for p in splits["train"]:
        if p.task.startswith(("add", "sub")):
            assert str(eval(p.prompt.rstrip("="))) == p.answer  # "47+5=" -> "52"
        elif p.task == "reverse":
            assert p.prompt == f"reverse {p.answer[::-1]}="
        else:
            assert p.prompt == f"copy {p.answer}="


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("7", "7", True),
        (" 7 ", "7", True),
        ("7<|end|>", "7", True),
        ("3+4=7", "7", True),  # last number is the final answer
        ("The answer is 7.", "7", True),
        ("answer: 7, since 3+4 is 7", "7", True),
        ("#### 52", "52", True),
        ("so \\boxed{52} it is, not 51", "52", True),
        ("7.0", "7", True),
        ("8", "7", False),
        ("77", "7", False),
        ("7 then 8", "7", False),
        ("", "7", False),
        ("seven", "7", False),
        ("dcba", "dcba", True),
        ("reverse abcd=dcba", "dcba", True),
        ("DCBA", "dcba", True),
        ("dcb", "dcba", False),
        ("dcba5", "dcba", True),
        ("abcd", "dcba", False),
        ("42", "dcba", False),
    ],
)
def test_check_answer_hand_cases(response, answer, expected):
    assert check_answer(response, answer) is expected


def test_extract_answer_prefers_boxed_then_marker_then_last():
    assert extract_answer("1 \\boxed{2} 3", numeric=True) == "2"
    assert extract_answer("1 answer is 2 3", numeric=True) == "2"
    assert extract_answer("1 2 3", numeric=True) == "3"
    assert extract_answer("no digits", numeric=True) is None


def test_wrong_answers_are_wrong():
    import random

    rng = random.Random(0)
    for p in split_problems(0)["train"][:500]:
        assert not check_answer(wrong_answer(p, rng), p.answer)
    assert wrong_answer(Problem("sub_1d", "easy", "1-1=", "0"), rng) in {"1", "2", "10"}


def test_preference_kto_and_rl_rows_agree_with_the_checker():
    answers = {p.prompt: p.answer for p in split_problems(0)["eval"]}
    for row in generate_rows("preference_hard", "eval"):
        assert set(row) == {"prompt", "chosen", "rejected", "task"}
        answer = answers[row["prompt"]]
        assert check_answer(row["chosen"], answer) and not check_answer(row["rejected"], answer)
    kto = generate_rows("kto", "train")
    labels = [row["label"] for row in kto]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    rl = {row["prompt"]: row["answer"] for row in generate_rows("rl", "train")}
    assert all(check_answer(row["completion"], rl[row["prompt"]]) is row["label"] for row in kto)


def test_sft_rows_have_plain_and_chat_forms():
    row = generate_rows("sft", "train")[0]
    assert row["messages"] == [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["response"]},
    ]


def test_materialize_writes_every_split_and_is_idempotent(tmp_path):
    paths = materialize_tiny_world(tmp_path / "world", seed=5)
    for kind in DATA_KINDS:
        for split in ("train", "eval"):
            assert read_jsonl(paths.data(kind, split)) == generate_rows(kind, split, seed=5)
    assert (paths.tokenizer_dir / "tokenizer.json").exists()
    assert json.loads((paths.data_dir / "manifest.json").read_text())["seed"] == 5
    before = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    materialize_tiny_world(tmp_path / "world", seed=5)
    assert {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()} == before
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temp dirs left


def test_concurrent_builders_share_one_build_and_crash_leftovers_are_removed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / ".tokenizer-crashed").mkdir(parents=True)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: materialize_tiny_world(tmp_path, seed=0), range(3)))
    assert len({r.root for r in results}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "data", "tokenizer"]


def test_materialize_refuses_a_dir_built_with_another_seed(tmp_path):
    materialize_tiny_world(tmp_path, seed=0)
    with pytest.raises(DataError, match="seed 0.*pick another directory"):
        materialize_tiny_world(tmp_path, seed=1)


def test_cache_dir_is_keyed_by_version_and_seed(monkeypatch, tmp_path):
    assert tiny_world_hash(0) != tiny_world_hash(1)
    monkeypatch.setattr(tiny_world, "TINY_WORLD_VERSION", tiny_world.TINY_WORLD_VERSION + 1)
    assert tiny_world_hash(0) != tiny_world.hashlib.sha256(b"").hexdigest()[:12]
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    paths = tiny_world.tiny_world_dir(seed=2)
    assert paths.root == tmp_path / "tiny_world" / tiny_world_hash(2)


def test_unknown_kind_or_checkpoint_names_the_known_ones(tiny_paths):
    with pytest.raises(DataError, match="kinds: pretrain, sft"):
        tiny_paths.data("dpo")
    with pytest.raises(DataError, match="archs: qwen2, llama"):
        tiny_paths.checkpoint("gpt2")


def test_chain_of_thought_rows_end_in_the_checked_answer():
    from rlhf.data.datasets import load_records
    from rlhf.data.tiny_world import Problem, chain_of_thought, check_answer, split_problems

    assert chain_of_thought(Problem("add_2d", "hard", "47+8=", "55")) == "7+8=15 40+15=55 #### 55"
    assert chain_of_thought(Problem("sub_2d", "hard", "53-7=", "46")) == "3-7=-4 50-4=46 #### 46"
    assert chain_of_thought(Problem("reverse", "medium", "reverse abc=", "cba")) == "c b a #### cba"
    problems = split_problems()["eval"]
    assert all(check_answer(chain_of_thought(p), p.answer) for p in problems)
    rows = load_records("tiny:cot:eval")
    assert len(rows) == len(problems) and set(rows[0].fields) == {"prompt", "response", "answer", "task"}
