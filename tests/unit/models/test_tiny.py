"""The scripted tiny model: a bigram automaton built by hand, so tests force what a model writes."""

import pytest
import torch

from rlhf.models.tiny import SCRIPTED_LOGIT, build_scripted_model

SCRIPT = {"=": ["a", "b"], "a": "c", "b": "c", "c": "\n", "\n": "<|end|>", "z": "z"}


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    return build_scripted_model(tiny_tokenizer, SCRIPT)


def next_token_probs(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return torch.softmax(model(**ids).logits[0, -1], dim=-1)


def test_next_token_follows_the_current_one_with_exact_probabilities(scripted, tiny_tokenizer):
    tok = tiny_tokenizer
    # the context before the last token does not matter: only the current token is read
    for text in ("c", "copy abc", "<|user|>\n3+4=c"):
        probs = next_token_probs(scripted, tok, text)
        assert probs[tok.convert_tokens_to_ids("Ċ")] == 1.0 and (probs > 0).sum() == 1  # Ċ: the newline byte
    branch = next_token_probs(scripted, tok, "copy ab=")
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    assert branch[a] == branch[b] == 0.5 and (branch > 0).sum() == 2
    # an unscripted current token has a zero embedding: all logits 0, every token equally likely
    uniform = next_token_probs(scripted, tok, "copy ab?")
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / len(tok)))
    assert SCRIPTED_LOGIT > 103.3  # exp(-103.3) is below float32's smallest subnormal: other tokens get exactly 0


def test_generation_writes_the_script_at_temperature_one(scripted, tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok("copy ab=", return_tensors="pt", add_special_tokens=False)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = scripted.generate(**prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8)
        seen.add(tok.decode(out[0, prompt["input_ids"].shape[1] :]))
    assert seen == {"ac\n<|end|>", "bc\n<|end|>"}  # stops at the end-of-turn token of the generation config
    loop = tok("z", return_tensors="pt", add_special_tokens=False)
    out = scripted.generate(**loop, do_sample=False, max_new_tokens=6)
    assert tok.decode(out[0, 1:]) == "zzzzzz"


def test_script_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="'ab' is 2 tokens"):
        build_scripted_model(tiny_tokenizer, {"ab": "c"})
    with pytest.raises(ValueError, match="at most 4 tokens"):
        build_scripted_model(tiny_tokenizer, {c: c for c in "abcde"}, hidden_size=4)
