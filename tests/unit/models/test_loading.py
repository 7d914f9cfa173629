"""Loading tokenizers and causal LMs: local dirs of both tiny archs, tiny names, clear path errors."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rlhf.errors import ConfigError
from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.models.paths import TINY_MODEL_NAMES, check_model_path
from rlhf.models.tiny import build_tiny_model, save_tiny_model


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_archs_round_trip_and_generate(arch, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model = build_tiny_model(
        arch, vocab_size=len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    save_tiny_model(model, tok, tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    loaded_tok = load_tokenizer(str(tmp_path))
    loaded = load_causal_lm(str(tmp_path), dtype="float32", tokenizer=loaded_tok)
    assert loaded.config.model_type == arch and loaded.dtype == torch.float32
    for name, param in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], param)

    prompt = loaded_tok("3+4=", return_tensors="pt")
    output = loaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 5
    assert loaded_tok.decode(output[0]).startswith("3+4=")


def test_tiny_names_resolve_to_cached_checkpoints(tiny_qwen2):
    assert resolve_model_path("tiny") == str(tiny_qwen2.checkpoint("qwen2", "policy-sft"))
    assert resolve_model_path("tiny-init:qwen2") == str(tiny_qwen2.checkpoint("qwen2", "policy-init"))
    assert set(TINY_MODEL_NAMES) >= {"tiny", "tiny:llama", "tiny-init:llama"}
    model = load_causal_lm("tiny", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.pad_token_id == load_tokenizer("tiny").pad_token_id


def test_unknown_tiny_name_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown tiny model 'tiny:gpt2'; known: tiny, tiny:qwen2"):
        resolve_model_path("tiny:gpt2")


@pytest.mark.parametrize("path", ["/no/such/model", "./checkpoints/step_10", "~/models/x", "a/b/c"])
def test_missing_local_path_names_it_and_the_fix(path):
    with pytest.raises(ConfigError, match=rf"model path '{path}' does not exist.*fix the path, give a Hub name"):
        load_causal_lm(path, dtype="float32")


def test_config_check_names_the_field_and_builds_nothing():
    check_model_path("tiny-init:llama", what="distill.teacher_path")  # a known tiny name, not built here
    with pytest.raises(ConfigError, match="distill.teacher_path '/ckpts/teacher' does not exist"):
        check_model_path("/ckpts/teacher", what="distill.teacher_path")


def test_hub_names_pass_through_and_bad_dirs_are_caught(tmp_path):
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ConfigError, match="holds no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        load_causal_lm("tiny", dtype="fp8")


def test_pad_falls_back_to_eos(tiny_tokenizer, tmp_path):
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|end|>")
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer), eos_token_id=tok.eos_token_id)
    save_tiny_model(model, tok, tmp_path)
    loaded_tok = load_tokenizer(tmp_path)
    assert loaded_tok.pad_token == "<|end|>"
    loaded = load_causal_lm(tmp_path, dtype="float32")
    assert loaded.config.pad_token_id == loaded_tok.eos_token_id == loaded.generation_config.pad_token_id
