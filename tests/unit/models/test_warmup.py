"""The tiny-world checkpoints: warm-up encoding, saved configs, and accuracy between 0 and 1."""

import json

import torch
from transformers import AutoModelForCausalLM

from rlhf.data.tiny_world import read_jsonl
from rlhf.models.tiny import build_scripted_model
from rlhf.models.warmup import (
    IGNORE_INDEX,
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


def test_accuracy_counts_every_sample_within_the_token_limit(tiny_tokenizer):
    """Scripted models (rlhf.models.tiny.build_scripted_model) whose answers are known: one answers every
    chat prompt "4c7" then ends its turn (the last number of "4c" is 4, of "4c7" it is 7); the other
    writes "4" or "5", each with probability exactly 1/2, then ends its turn."""
    model = build_scripted_model(tiny_tokenizer, {"\n": "4", "4": "c", "c": "7", "7": "<|end|>"})
    rows = [{"prompt": "9-5=", "answer": "4"}, {"prompt": "9-2=", "answer": "7"}, {"prompt": "1+1=", "answer": "2"}]
    assert evaluate_accuracy(model, tiny_tokenizer, rows, max_new_tokens=2, samples_per_prompt=3) == 1 / 3
    assert evaluate_accuracy(model, tiny_tokenizer, rows, max_new_tokens=3, samples_per_prompt=3) == 1 / 3
    assert evaluate_accuracy(model, tiny_tokenizer, rows[:1], max_new_tokens=3) == 0.0  # "4c7" answers 7
    assert evaluate_accuracy(model, tiny_tokenizer, rows[1:2], max_new_tokens=2) == 0.0  # "4c" answers 4
    coin = build_scripted_model(tiny_tokenizer, {"\n": ["4", "5"], "4": "<|end|>", "5": "<|end|>"})
    accuracy = evaluate_accuracy(coin, tiny_tokenizer, rows[:1], samples_per_prompt=64)
    # 64 samples of one prompt, each drawn on its own: k of 64 right (all alike has probability 2^-63)
    assert 0 < accuracy < 1 and (accuracy * 64).is_integer()
