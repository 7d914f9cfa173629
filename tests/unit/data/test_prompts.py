"""Prompt datasets: loading, validation messages (file, row, field, fix), and encoding."""

import json
from collections import Counter

import pytest

from rlhf.data.prompts import PromptExample, encode_prompts, load_prompt_dataset
from rlhf.errors import ConfigError, DataError


def _jsonl(tmp_path, rows, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plain_rows_keep_other_fields_as_metadata(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "1+1=", "answer": 2, "source": "hand"}])
    [row] = load_prompt_dataset(path)
    assert row == PromptExample("1+1=", {"answer": "2", "source": "hand"}, f"{path}, line 1")


def test_answer_key_and_prompt_key_are_renamed_into_place(tmp_path):
    path = _jsonl(tmp_path, [{"question": "1+1=", "solution": "2"}])
    [row] = load_prompt_dataset(path, prompt_key="question", answer_key="solution")
    assert row.prompt == "1+1=" and row.metadata == {"solution": "2", "answer": "2"}
    [row] = load_prompt_dataset(path, prompt_key="question", answer_key=None)
    assert row.metadata == {"solution": "2"}


def test_chat_message_prompts(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    path = _jsonl(tmp_path, [{"messages": messages, "answer": "2"}])
    [row] = load_prompt_dataset(path, prompt_key="messages")
    assert row.prompt == messages


def test_missing_column_lists_the_columns_present(tmp_path):
    path = _jsonl(tmp_path, [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(DataError) as info:
        load_prompt_dataset(path)
    message = str(info.value)
    assert "prompts.jsonl, line 1" in message and "no field 'prompt'" in message
    assert "answer, question" in message and "prompt_key=" in message


def test_missing_answer_says_how_to_opt_out(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "a", "answer": "1"}, {"prompt": "b", "anwser": "2"}])
    with pytest.raises(DataError, match=r"line 2: no field 'answer' \(did you mean 'anwser'\?\).*answer_key=None"):
        load_prompt_dataset(path)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "", "answer": "1"}, r"line 2: field 'prompt' is empty"),
        ({"prompt": "   ", "answer": "1"}, r"line 2: field 'prompt' is empty"),
        ({"prompt": 12, "answer": "1"}, r"line 2: field 'prompt' must be a string, got int 12"),
        ({"prompt": None, "answer": "1"}, r"line 2: field 'prompt' must be a string, got NoneType"),
        ({"prompt": "a", "answer": ""}, r"line 2: field 'answer' is empty"),
        ({"prompt": "a", "answer": ["1"]}, r"line 2: field 'answer' must be a string or a number, got list"),
        ({"prompt": [], "answer": "1"}, r"line 2: field 'prompt' must be a non-empty list of chat messages"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, r"line 2: field 'prompt', message 0 must be an object"),
        ({"prompt": [{"role": "bot", "content": "x"}], "answer": "1"}, r"message 0 has role 'bot'; use one of system"),
        ({"prompt": [{"role": "user", "content": 3}], "answer": "1"}, r"message 0 content must be a string"),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"},
            r"line 2: field 'prompt' ends with an assistant message",
        ),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, row, match):
    path = _jsonl(tmp_path, [{"prompt": "ok", "answer": "1"}, row], name="bad.jsonl")
    with pytest.raises(DataError, match=match) as info:
        load_prompt_dataset(path)
    assert str(tmp_path / "bad.jsonl") in str(info.value)


def test_csv_row_numbers_are_file_lines(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\n1+1=,2\n,3\n")
    with pytest.raises(DataError, match=r"p.csv, line 3: field 'prompt' is empty"):
        load_prompt_dataset(str(path))


def test_tiny_sources(tiny_paths):
    train = load_prompt_dataset("tiny")
    evals = load_prompt_dataset("tiny:eval")
    assert load_prompt_dataset("tiny", split="eval") == evals
    assert len(train) > len(evals) > 100
    assert {"answer", "task", "difficulty"} <= set(evals[0].metadata)
    assert not {r.prompt for r in train} & {r.prompt for r in evals}


def test_tiny_task_subset_is_balanced(tiny_paths):
    rows = load_prompt_dataset("tiny:train:reverse+sub_1d")
    counts = Counter(r.metadata["task"] for r in rows)
    assert counts == {"reverse": 800, "sub_1d": 800}  # sub_1d has 44 train problems, repeated
    assert len({r.prompt for r in rows if r.metadata["task"] == "sub_1d"}) == 44
    evals = load_prompt_dataset("tiny:eval:copy")
    assert {r.prompt for r in evals} == {
        r.prompt for r in load_prompt_dataset("tiny:eval") if r.metadata["task"] == "copy"
    }
    for bad in ("tiny:train:mul", "tiny:test:copy", "tiny:copy", "tiny:train:copy+copy", "tiny:train:"):
        with pytest.raises(ConfigError, match="tiny"):
            load_prompt_dataset(bad)


def test_encode_with_chat_template_and_plain(tiny_tokenizer):
    rows = [PromptExample("3+4="), PromptExample([{"role": "user", "content": "3+4="}])]
    chat = encode_prompts(rows, tiny_tokenizer, max_prompt_length=32)
    assert chat[0] == chat[1]
    assert tiny_tokenizer.decode(chat[0]) == "<|bos|><|user|>\n3+4=<|end|><|assistant|>\n"
    [plain] = encode_prompts(rows[:1], tiny_tokenizer, max_prompt_length=32, use_chat_template=False)
    assert tiny_tokenizer.decode(plain) == "3+4="
    with pytest.raises(DataError, match="chat messages; set use_chat_template=True"):
        encode_prompts(rows[1:], tiny_tokenizer, max_prompt_length=32, use_chat_template=False)


def test_too_long_prompt_names_the_row_or_truncates(tiny_tokenizer):
    rows = [PromptExample("1+1="), PromptExample("1234567890+1=", where="p.jsonl, line 2")]
    with pytest.raises(DataError, match=r"1 prompt\(s\) exceed max_prompt_length=8 \(p.jsonl, line 2 has 13 tokens\)"):
        encode_prompts(rows, tiny_tokenizer, max_prompt_length=8, use_chat_template=False)
    left = encode_prompts(rows, tiny_tokenizer, max_prompt_length=8, use_chat_template=False, truncation="left")
    right = encode_prompts(rows, tiny_tokenizer, max_prompt_length=8, use_chat_template=False, truncation="right")
    assert tiny_tokenizer.decode(left[0]) == "1+1="
    assert tiny_tokenizer.decode(left[1]) == "67890+1=" and tiny_tokenizer.decode(right[1]) == "12345678"


def test_encode_rejects_bad_options(tiny_tokenizer):
    with pytest.raises(ConfigError, match="truncation"):
        encode_prompts([PromptExample("a")], tiny_tokenizer, max_prompt_length=8, truncation="middle")
    with pytest.raises(ConfigError, match="max_prompt_length must be positive"):
        encode_prompts([PromptExample("a")], tiny_tokenizer, max_prompt_length=0)
