"""The tiny-world checkpoints: warm-up encoding, saved configs, and accuracy between 0 and 1."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.data.tiny_world import read_jsonl
from rlhf.models.tiny import build_scripted_model
from rlhf.models.warmup import (
    IGNORE_INDEX,
    answer_probabilities,
    encode_sft_example,
    evaluate_accuracy,
    generate_responses,
)


def test_sft_example_trains_on_response_and_eos_only(tiny_tokenizer):
    input_ids, labels = encode_sft_example(tiny_tokenizer, "3+4=", "7")
    assert tiny_tokenizer.decode(input_ids) == "<|bos|><|user|>\n3+4=<|end|><|assistant|>\n7<|end|>"
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == "7<|end|>"
    assert labels[-2:] == input_ids[-2:]


def test_checkpoints_carry_consistent_special_token_ids(tiny_qwen2, tiny_tokenizer):
    for name in ("policy-init", "policy-sft"):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen2.checkpoint("qwen2", name))
        for config in (model.config, model.generation_config):
            assert config.eos_token_id == tiny_tokenizer.eos_token_id
            assert config.pad_token_id == tiny_tokenizer.pad_token_id
            assert config.bos_token_id == tiny_tokenizer.bos_token_id
        assert model.config.vocab_size == len(tiny_tokenizer)
        assert model.config.hidden_size == 128 and model.config.num_attention_heads == 4


def test_warmed_up_policy_solves_some_but_not_all_eval_prompts(tiny_qwen2, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2.checkpoint("qwen2", "policy-sft"))
    rows = read_jsonl(tiny_qwen2.data("rl", "eval"))
    sampled = evaluate_accuracy(model, tiny_tokenizer, rows, temperature=1.0, seed=1)
    assert 0.1 < sampled < 0.9
    report = json.loads((tiny_qwen2.checkpoint("qwen2", "policy-sft") / "warmup.json").read_text())
    assert 0.1 < report["eval_accuracy_sampled"] < 0.9


def test_random_init_policy_solves_nothing(tiny_qwen2, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2.checkpoint("qwen2", "policy-init"))
    rows = read_jsonl(tiny_qwen2.data("rl", "eval"))[:32]
    assert evaluate_accuracy(model, tiny_tokenizer, rows, temperature=0.0) < 0.1


def test_sampling_is_seeded(tiny_qwen2, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2.checkpoint("qwen2", "policy-sft"))
    prompts = ["3+4=", "reverse abcd="] * 4
    first = generate_responses(model, tiny_tokenizer, prompts, seed=3)
    assert first == generate_responses(model, tiny_tokenizer, prompts, seed=3)
    state = torch.random.get_rng_state()
    generate_responses(model, tiny_tokenizer, prompts, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_answer_probabilities_by_hand(tiny_tokenizer):
    """On a scripted model the probability of an answer is known: after the chat prompt's last token (a
    newline) it writes "4" or "5" with probability 1/2 each, then ends its turn."""
    model = build_scripted_model(tiny_tokenizer, {"\n": ["4", "5"], "4": "<|end|>", "5": "<|end|>"})
    rows = [{"prompt": "9-5=", "answer": "4"}, {"prompt": "2+3=", "answer": 5}, {"prompt": "1+1=", "answer": "2"}]
    assert answer_probabilities(model, tiny_tokenizer, rows) == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)
    # a longer answer: the product of its tokens' probabilities ("4" then "5" has 1/2 × 0 after "4")
    assert answer_probabilities(model, tiny_tokenizer, [{"prompt": "x", "answer": "45"}]) == [0.0]
