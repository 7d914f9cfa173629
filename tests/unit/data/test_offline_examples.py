"""Offline encoders: token ids and loss masks per format, checked token by token; every row error."""

import dataclasses
import json

import pytest

from rlhf.config import DataConfig
from rlhf.data.examples import (
    KTOExample,
    PairExample,
    SequenceExample,
    encode_answers,
    encode_dataset,
    resolve_format,
)
from rlhf.data.sources import read_records
from rlhf.errors import ConfigError, DataError

# The tiny chat template renders <|bos|><|user|>\n{content}<|end|><|assistant|>\n{content}<|end|>...
# and every digit, letter and punctuation mark is its own token ("\n" is "Ċ").
PROMPT_3_PLUS_4 = ["<|bos|>", "<|user|>", "Ċ", "3", "+", "4", "=", "<|end|>", "<|assistant|>", "Ċ"]


def _records(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(path)


def _encode(tmp_path, tokenizer, rows, kind, **cfg):
    return encode_dataset(_records(tmp_path, rows), tokenizer, DataConfig(**cfg), kind)


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------------------------------------
# Token ids and masks


def test_text_is_all_loss_with_the_first_token_as_prompt(tmp_path, tiny_tokenizer):
    (example,) = _encode(tmp_path, tiny_tokenizer, [{"text": "3+4=7\n"}], "text").examples
    assert _tokens(tiny_tokenizer, example.prompt_ids) == ["3"]
    assert _tokens(tiny_tokenizer, example.response_ids) == ["+", "4", "=", "7", "Ċ", "<|end|>"]
    assert example.loss_mask == [1] * 6


def test_long_text_is_split_into_blocks_that_keep_every_token(tmp_path, tiny_tokenizer):
    # "3+4=7\n" + eos is 7 tokens; max_length 3 gives blocks [3 + 4] [= 7 Ċ] [<|end|>] -> the last is dropped
    data = _encode(tmp_path, tiny_tokenizer, [{"text": "3+4=7\n"}], "text", max_length=3, overlong="drop")
    blocks = data.examples
    assert [_tokens(tiny_tokenizer, b.prompt_ids + b.response_ids) for b in blocks] == [
        ["3", "+", "4"],
        ["=", "7", "Ċ"],
    ]
    assert all(b.loss_mask == [1, 1] for b in blocks) and blocks[1].where.endswith("(block 2)")
    assert (data.stats.split, data.stats.dropped, data.stats.truncated) == (1, 0, 0)


def test_instruction_masks_the_prompt_and_trains_the_response_with_eos(tmp_path, tiny_tokenizer):
    (example,) = _encode(tmp_path, tiny_tokenizer, [{"prompt": "3+4=", "response": "7"}], "instruction").examples
    assert _tokens(tiny_tokenizer, example.prompt_ids) == PROMPT_3_PLUS_4
    assert _tokens(tiny_tokenizer, example.response_ids) == ["7", "<|end|>"]
    assert example.loss_mask == [1, 1]
    assert example.where.endswith("rows.jsonl, line 1")


def test_instruction_loss_on_all_keeps_only_the_first_token_in_the_prompt(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "3+4=", "response": "7"}]
    (example,) = _encode(tmp_path, tiny_tokenizer, rows, "instruction", loss_on="all").examples
    assert _tokens(tiny_tokenizer, example.prompt_ids) == ["<|bos|>"]
    assert _tokens(tiny_tokenizer, example.response_ids) == PROMPT_3_PLUS_4[1:] + ["7", "<|end|>"]
    assert example.loss_mask == [1] * 11


def test_instruction_without_chat_template_is_plain_text_plus_eos(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "3+4=", "completion": "7"}]  # TRL's column name is read when response is missing
    (example,) = _encode(tmp_path, tiny_tokenizer, rows, "instruction", use_chat_template=False).examples
    assert _tokens(tiny_tokenizer, example.prompt_ids) == ["3", "+", "4", "="]
    assert _tokens(tiny_tokenizer, example.response_ids) == ["7", "<|end|>"]


def test_messages_mask_only_assistant_turns(tmp_path, tiny_tokenizer):
    conversation = [
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "9-5="},
        {"role": "assistant", "content": "4"},
    ]
    (example,) = _encode(tmp_path, tiny_tokenizer, [{"messages": conversation}], "messages").examples
    # Rendered: <|bos|><|user|>\n3+4=<|end|><|assistant|>\n | 7<|end|> | <|user|>\n9-5=<|end|><|assistant|>\n | 4<|end|>
    assert _tokens(tiny_tokenizer, example.prompt_ids) == PROMPT_3_PLUS_4
    response = ["7", "<|end|>", "<|user|>", "Ċ", "9", "-", "5", "=", "<|end|>", "<|assistant|>", "Ċ", "4", "<|end|>"]
    assert _tokens(tiny_tokenizer, example.response_ids) == response
    assert example.loss_mask == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    # the pieces add up to the template's own rendering of the whole conversation
    whole = tiny_tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tiny_tokenizer.decode(example.prompt_ids + example.response_ids) == whole


def test_preference_pairs_from_texts_and_from_message_lists(tmp_path, tiny_tokenizer):
    as_text = {"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": "0.5"}
    user = {"role": "user", "content": "3+4="}
    as_messages = {
        "chosen": [user, {"role": "assistant", "content": "7"}],
        "rejected": [user, {"role": "assistant", "content": "8"}],
    }
    as_prompt_and_messages = {
        "prompt": "3+4=",
        "chosen": [{"role": "assistant", "content": "7"}],
        "rejected": [{"role": "assistant", "content": "8"}],
    }
    rows = [as_text, as_messages, as_prompt_and_messages]
    pairs = _encode(tmp_path, tiny_tokenizer, rows, "preference").examples
    for pair in pairs:
        assert _tokens(tiny_tokenizer, pair.prompt_ids) == PROMPT_3_PLUS_4
        assert _tokens(tiny_tokenizer, pair.chosen_ids) == ["7", "<|end|>"]
        assert _tokens(tiny_tokenizer, pair.rejected_ids) == ["8", "<|end|>"]
    assert [p.margin for p in pairs] == [0.5, 0.0, 0.0]


def test_encode_answers_encodes_a_conversation_as_a_preference_row_is_encoded(tmp_path, tiny_tokenizer):
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4="}]
    rows = [{"prompt": "3+4=", "chosen": "7", "rejected": "8"}, {"prompt": system, "chosen": "7", "rejected": "8"}]
    pairs = _encode(tmp_path, tiny_tokenizer, rows, "preference").examples
    answers = encode_answers(tiny_tokenizer, [("3+4=", "7"), (system, "7")], where="sample")
    assert answers == [(pair.prompt_ids, pair.chosen_ids) for pair in pairs]


def test_kto_labels_accept_boolean_like_values(tmp_path, tiny_tokenizer):
    labels = [True, False, 1, 0, "yes", "no", "True", "0"]
    rows = [{"prompt": "3+4=", "response": "7", "label": label} for label in labels]
    examples = _encode(tmp_path, tiny_tokenizer, rows, "kto").examples
    assert [e.desirable for e in examples] == [True, False, True, False, True, False, True, False]
    assert _tokens(tiny_tokenizer, examples[0].response_ids) == ["7", "<|end|>"]


@pytest.mark.parametrize(
    "tiny_kind, fmt, example_type",
    [
        ("pretrain", "text", SequenceExample),
        ("sft", "instruction", SequenceExample),
        ("sft", "messages", SequenceExample),
        ("preference", "preference", PairExample),
        ("kto", "kto", KTOExample),
    ],
)
def test_every_tiny_world_file_encodes(tiny_paths, tiny_tokenizer, tiny_kind, fmt, example_type):
    records = read_records(tiny_paths.data(tiny_kind, "eval"))
    data = encode_dataset(records, tiny_tokenizer, DataConfig(), fmt, name="eval")
    assert len(data) == len(records) and data.stats.dropped == 0
    assert all(isinstance(e, example_type) for e in data.examples)
    assert data.stats.tokens > 0


def test_auto_format_follows_the_fields(tiny_paths, tiny_tokenizer):
    cfg = DataConfig()
    found = {k: resolve_format(read_records(tiny_paths.data(k, "eval"))[0], cfg) for k in ("pretrain", "sft", "kto")}
    assert found == {"pretrain": "text", "sft": "instruction", "kto": "kto"}
    records = read_records(tiny_paths.data("preference", "eval"))
    assert encode_dataset(records, tiny_tokenizer, cfg, "auto").kind == "preference"


def test_auto_format_error_lists_the_expected_columns(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"rows.jsonl, line 1: cannot tell the data format.*Set data.format"):
        _encode(tmp_path, tiny_tokenizer, [{"question": "3+4="}], "auto")


# ---------------------------------------------------------------------------------------------
# Length limits


def test_overlong_truncates_the_response_and_counts(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "3+4=", "response": "abcdef"}, {"prompt": "3+4=", "response": "7"}]
    # prompt 10 tokens; "abcdef" + eos = 7 tokens → 17 > 13: keep 3 response tokens
    data = _encode(tmp_path, tiny_tokenizer, rows, "instruction", max_length=13)
    assert _tokens(tiny_tokenizer, data.examples[0].response_ids) == ["a", "b", "c"]
    assert data.examples[0].loss_mask == [1, 1, 1]
    assert (data.stats.rows, data.stats.truncated, data.stats.dropped) == (2, 1, 0)
    assert data.stats.tokens == 13 + 12


def test_overlong_drop_and_prompts_that_leave_no_room(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "3+4=", "response": "abcdef"}, {"prompt": "3+4=", "response": "7"}]
    dropped = _encode(tmp_path, tiny_tokenizer, rows, "instruction", max_length=13, overlong="drop")
    assert len(dropped) == 1 and dropped.stats.dropped == 1
    # a 10-token prompt leaves no response token at max_length 10: dropped even when truncating
    with pytest.raises(DataError, match=r"every row of the train dataset \(2\) is longer than data.max_length=10"):
        _encode(tmp_path, tiny_tokenizer, rows, "instruction", max_length=10)


def test_pairs_truncate_both_sides_and_drop_when_they_become_equal(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "3+4=", "chosen": "abcd", "rejected": "abce"},  # equal within 2 tokens: dropped
        {"prompt": "3+4=", "chosen": "abcd", "rejected": "aecd"},
    ]
    data = _encode(tmp_path, tiny_tokenizer, rows, "preference", max_length=12)
    assert data.stats.dropped == 1 and data.stats.truncated == 1
    (pair,) = data.examples
    assert _tokens(tiny_tokenizer, pair.chosen_ids) == ["a", "b"]
    assert _tokens(tiny_tokenizer, pair.rejected_ids) == ["a", "e"]


def test_bad_length_settings_are_config_errors(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "3+4=", "response": "7"}]
    with pytest.raises(ConfigError, match="data.overlong='cut' is not one of truncate, drop"):
        _encode(tmp_path, tiny_tokenizer, rows, "instruction", overlong="cut")
    with pytest.raises(ConfigError, match="data.loss_on='prompt'"):
        _encode(tmp_path, tiny_tokenizer, rows, "instruction", loss_on="prompt")
    with pytest.raises(ConfigError, match="data.format='sft'"):
        _encode(tmp_path, tiny_tokenizer, rows, "sft")


# ---------------------------------------------------------------------------------------------
# Row errors: each names the file, the line and the field


@pytest.mark.parametrize(
    "kind, row, message",
    [
        ("instruction", {"promt": "3+4=", "response": "7"}, r"line 1: no field 'prompt' \(did you mean 'promt'\?\)"),
        ("instruction", {"prompt": "3+4=", "answer": "7"}, r"line 1: no field 'response'.*data.response_key=<name>"),
        ("instruction", {"prompt": "3+4=", "response": "  "}, r"line 1: field 'response' is empty"),
        ("text", {"text": 7}, r"line 1: field 'text' must be a string, got int"),
        ("preference", {"prompt": "3+4=", "chosen": "7", "rejected": "7"}, r"fields 'chosen' and 'rejected' are identical"),
        ("preference", {"prompt": "3+4=", "chosen": "7", "rejected": [{"role": "assistant", "content": "8"}]}, r"must both be texts or both be message lists"),
        ("preference", {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "7"}],
                        "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "8"}]},
         r"continue different conversations"),
        ("preference", {"chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]},
         r"field 'chosen' holds only the assistant message and the row has no 'prompt'"),
        ("preference", {"prompt": "3+4=", "chosen": [{"role": "assistant", "content": "7"}, {"role": "user", "content": "?"}],
                        "rejected": [{"role": "assistant", "content": "8"}]},
         r"field 'chosen' must end with the assistant message"),
        ("preference", {"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": "big"}, r"field 'margin' must be a number"),
        ("kto", {"prompt": "3+4=", "response": "7", "label": "maybe"}, r"field 'label' must say whether .* got 'maybe'"),
        ("kto", {"prompt": "3+4=", "response": "7", "label": 2}, r"field 'label' must say whether"),
        ("kto", {"prompt": "3+4=", "response": "7"}, r"no field 'label'.*data.label_key=<name>"),
        ("messages", {"messages": "hi"}, r"field 'messages' must be a non-empty list of chat messages"),
        ("messages", {"messages": [{"content": "hi"}]}, r"field 'messages', message 0 must be an object with \"role\""),
        ("messages", {"messages": [{"role": "user", "content": "hi"}]}, r"field 'messages' has no assistant message"),
        ("messages", {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
         r"field 'messages' starts with an assistant message"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
         r"field 'messages', message 1 \(assistant\) is empty"),
        ("messages", {"messages": [{"role": "robot", "content": "hi"}]}, r"message 0 has role 'robot'"),
    ],
)  # fmt: skip
def test_row_errors_name_file_line_and_field(tmp_path, tiny_tokenizer, kind, row, message):
    good = {
        "instruction": {"prompt": "1+1=", "response": "2"},
        "text": {"text": "1+1=2"},
        "preference": {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        "kto": {"prompt": "1+1=", "response": "2", "label": True},
        "messages": {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
    }[kind]
    with pytest.raises(DataError, match=r"bad.jsonl, line 2") as error:  # the bad row is the file's second line
        encode_dataset(_records(tmp_path, [good, row], "bad.jsonl"), tiny_tokenizer, DataConfig(), kind)
    assert error.match(message.replace("line 1", "line 2"))


def test_messages_need_a_chat_template(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}]
    with pytest.raises(ConfigError, match="messages-format data needs a chat template"):
        _encode(tmp_path, tiny_tokenizer, rows, "messages", use_chat_template=False)


def test_chat_prompt_without_template_names_the_row(tmp_path, tiny_tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "response": "2"}]
    with pytest.raises(DataError, match=r"rows.jsonl, line 1: the prompt is a list of chat messages"):
        _encode(tmp_path, tiny_tokenizer, rows, "instruction", use_chat_template=False)


def test_custom_column_names(tmp_path, tiny_tokenizer):
    rows = [{"q": "3+4=", "good": "7", "bad": "8", "m": 2}]
    cfg = dataclasses.replace(DataConfig(), prompt_key="q", chosen_key="good", rejected_key="bad", margin_key="m")
    (pair,) = encode_dataset(_records(tmp_path, rows), tiny_tokenizer, cfg, "auto").examples
    assert pair.margin == 2.0 and _tokens(tiny_tokenizer, pair.chosen_ids) == ["7", "<|end|>"]
