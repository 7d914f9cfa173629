"""The tiny tokenizer: determinism, single-character digits and letters, round trips, chat template."""

import string

import pytest
from transformers import AutoTokenizer

from rlhf.data.tiny_world import generate_rows
from rlhf.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    encode_chat_prompt,
    render_chat_prompt,
    save_tiny_tokenizer,
    tokenizer_differences,
    train_tiny_tokenizer,
)

ALNUM = string.ascii_letters + string.digits


def _corpus():
    return [row["text"] for row in generate_rows("pretrain", "train")]


def test_training_is_deterministic_and_matches_the_cached_tokenizer(tiny_paths, tmp_path):
    first, second = train_tiny_tokenizer(_corpus()), train_tiny_tokenizer(_corpus())
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    # The cached one was trained in another process (Rust hash maps are seeded per process).
    cached = AutoTokenizer.from_pretrained(tiny_paths.tokenizer_dir)
    assert cached.get_vocab() == first.get_vocab()


def test_vocab_is_small_with_special_tokens(tiny_tokenizer):
    assert len(tiny_tokenizer) < 512
    assert tiny_tokenizer.bos_token == BOS_TOKEN and tiny_tokenizer.eos_token == EOS_TOKEN
    ids = {tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tiny_tokenizer("3+4=")["input_ids"] == tiny_tokenizer("3+4=", add_special_tokens=False)["input_ids"]


def test_each_digit_and_letter_is_one_token(tiny_tokenizer):
    for text in ["0123456789", "abcdexyz", "9999", "47+35=82", "reverse abcd=dcba"]:
        tokens = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(text)["input_ids"])
        with_alnum = [t for t in tokens if any(c in ALNUM for c in t)]
        assert with_alnum == [c for c in text if c in ALNUM]


@pytest.mark.parametrize("text", ["47+35=82\n", "reverse abcd=dcba", "  spaces\tand tabs ", "héllo wörld ∑ 🙂"])
def test_decode_round_trips_any_text(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_chat_template_renders_prompt_for_generation(tiny_tokenizer):
    ids = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "3+4="}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tiny_tokenizer.decode(ids) == "<|bos|><|user|>\n3+4=<|end|><|assistant|>\n"
    assert ids == encode_chat_prompt(tiny_tokenizer, "3+4=")


def test_prompt_plus_response_plus_eos_is_the_whole_conversation(tiny_tokenizer):
    # Lets SFT find the response tokens by length, and a generation that stops at eos is a full turn.
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "47+5="}]
    full = messages + [{"role": "assistant", "content": "52"}]
    rendered = tiny_tokenizer.apply_chat_template(full, tokenize=False)
    assert rendered == render_chat_prompt(tiny_tokenizer, messages) + "52" + EOS_TOKEN
    ids = tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prompt_ids = encode_chat_prompt(tiny_tokenizer, messages)
    assert ids[: len(prompt_ids)] == prompt_ids and ids[-1] == tiny_tokenizer.eos_token_id


def test_unknown_role_is_rejected(tiny_tokenizer):
    with pytest.raises(Exception, match="roles system, user and assistant"):
        tiny_tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path):
    tokenizer = train_tiny_tokenizer(["1+2=3\n"] * 10)
    loaded = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tokenizer, tmp_path))
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded("12+3=15")["input_ids"] == tokenizer("12+3=15")["input_ids"]


def test_tokenizer_differences_name_what_changes_the_ids_or_their_rendering(tiny_paths, tiny_tokenizer):
    same = AutoTokenizer.from_pretrained(tiny_paths.tokenizer_dir)
    assert tokenizer_differences(tiny_tokenizer, same) == []
    same.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_differences(tiny_tokenizer, same) == ["chat template"]
    other = train_tiny_tokenizer(["+++ --- *** ===    !!"] * 20)  # same specials and template, other merges
    assert tokenizer_differences(tiny_tokenizer, other)[0].startswith("vocabulary")
