"""Every model.peft.method on the tiny qwen2 model: what trains (counted by hand), validation, merged export.

The tiny model (rlhf.models.tiny defaults, vocab 64): hidden 128, 2 layers, 4 query heads and 2
key/value heads of dim 32 (k_proj/v_proj: 128 → 64), MLP 384, biases on q/k/v only, untied head.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import get_peft_model

from rlhf.config import LoraConfig, ModelConfig, PeftConfig, RLHFConfig, validate
from rlhf.engines.train_engine import iter_full_parameters
from rlhf.errors import ConfigError
from rlhf.models.peft_methods import (
    PEFT_METHODS,
    SCALAR_HEAD_PEFT_METHODS,
    check_scalar_head_peft,
    peft_method,
    validate_peft,
)
from rlhf.models.peft_utils import VirtualTokenLM, apply_peft, export_root, find_peft_model, peft_config
from rlhf.models.tiny import build_tiny_model, tiny_config

VOCAB = 64
# per layer: q 128·128+128, k 64·128+64, v 64·128+64, o 128·128, gate/up/down 3·384·128, 2 norms of 128
LAYER = 16512 + 8256 + 8256 + 16384 + 3 * 49152 + 256
TOTAL = 64 * 128 + 2 * LAYER + 128 + 64 * 128  # embed, layers, final norm, lm_head = 410752

LORA_QV = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
# method -> (model config, trainable parameters worked out by hand)
EXPECTED = {
    # q: A 4×128 + B 128×4; v: A 4×128 + B 64×4; two layers
    "lora": (ModelConfig(lora=LORA_QV), 2 * (1024 + 768)),
    # q: hada_w1_a/w2_a 128×4, hada_w1_b/w2_b 4×128; v: 64×4 ×2 + 4×128 ×2
    "loha": (ModelConfig(lora=LORA_QV, peft=PeftConfig(method="loha")), 2 * (2048 + 1536)),
    # W = w1 ⊗ w2 with 128 = 8·16, 64 = 8·8 (peft's factorisation); w1 full, w2 = w2_a·w2_b of rank 4
    # q (128×128): w1 8×8 + w2_a 16×4 + w2_b 4×16 = 192; v (64×128): w1 8×8 + w2_a 8×4 + w2_b 4×16 = 160
    "lokr": (ModelConfig(lora=LORA_QV, peft=PeftConfig(method="lokr")), 2 * (192 + 160)),
    # peft's qwen2 default: l on q_proj (128), v_proj (64) outputs and down_proj's input (384)
    "ia3": (ModelConfig(peft=PeftConfig(method="ia3")), 2 * (128 + 64 + 384)),
    # 4 virtual token embeddings of 128
    "prompt_tuning": (ModelConfig(peft=PeftConfig(method="prompt_tuning", num_virtual_tokens=4)), 4 * 128),
    # 4 tokens × 2 layers × (key, value) × 2 kv heads · 32
    "prefix_tuning": (ModelConfig(peft=PeftConfig(method="prefix_tuning", num_virtual_tokens=4)), 4 * 2 * 2 * 64),
    # embeddings 4×128, MLP 128→32→32→128 with biases
    "p_tuning": (
        ModelConfig(peft=PeftConfig(method="p_tuning", num_virtual_tokens=4, encoder_hidden_size=32)),
        4 * 128 + (128 * 32 + 32) + (32 * 32 + 32) + (32 * 128 + 128),
    ),
    # q/k/v biases: (128 + 64 + 64) per layer
    "bitfit": (ModelConfig(peft=PeftConfig(method="bitfit")), 2 * 256),
    # everything but the embeddings and layer 0
    "freeze": (
        ModelConfig(peft=PeftConfig(method="freeze", frozen_patterns=["embed_tokens"], frozen_layers=1)),
        TOTAL - 64 * 128 - LAYER,
    ),
}


def tiny() -> torch.nn.Module:
    return build_tiny_model("qwen2", vocab_size=VOCAB, seed=0)


def count(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def test_tiny_model_size_matches_the_hand_count():
    assert count(tiny()) == (TOTAL, TOTAL)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_method_trains_only_its_parameters(method):
    model_cfg, expected = EXPECTED[method]
    assert peft_method(model_cfg) == method
    model = apply_peft(tiny(), model_cfg)
    _, trainable = count(model)
    assert trainable == expected
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "bitfit":
        assert all(n.endswith(".bias") for n in names)
    if method == "freeze":
        assert not [n for n in names if "embed_tokens" in n or ".layers.0." in n]
        assert "model.layers.1.mlp.up_proj.weight" in names
    # the plain model stays reachable under its HF names (what the export walks)
    assert "model.layers.0.self_attn.q_proj" in dict(export_root(model).named_modules())


def test_lora_rank_alone_still_means_lora():
    cfg = ModelConfig(lora=LoraConfig(rank=8))
    assert peft_method(cfg) == "lora"
    assert find_peft_model(apply_peft(tiny(), cfg)) is not None
    assert peft_method(ModelConfig()) == "none"
    assert set(PEFT_METHODS) == {"none", "qlora"} | set(EXPECTED)


def test_prompt_tuned_logits_line_up_with_the_input():
    model = apply_peft(tiny(), ModelConfig(peft=PeftConfig(method="prompt_tuning", num_virtual_tokens=4)))
    assert isinstance(model, VirtualTokenLM)
    ids = torch.randint(1, VOCAB, (2, 7))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(7).expand(2, 7))
    assert out.logits.shape == (2, 7, VOCAB)
    assert model.config.vocab_size == VOCAB  # attributes pass through to the wrapped model


# -- validation ------------------------------------------------------------------------------


def config(stage: str = "sft", **peft) -> RLHFConfig:
    cfg = RLHFConfig(stage=stage)
    cfg.model.peft = PeftConfig(**peft)
    return cfg


def test_qlora_on_cpu_is_a_config_error():
    cfg = config("grpo", method="qlora")
    cfg.model.lora.rank = 8
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*cluster.device=cuda"):
        validate(cfg)  # the root config's validate() runs the PEFT checks


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_without_bitsandbytes_is_a_config_error():
    cfg = config(method="qlora")
    cfg.model.lora.rank = 8
    cfg.cluster.device = "cuda"
    with pytest.raises(ConfigError, match="needs a CUDA GPU and the bitsandbytes package"):
        validate_peft(cfg, rl_stage=False)


def test_virtual_tokens_refuse_packed_rows():
    cfg = config(method="prompt_tuning")
    cfg.data.packing = True
    with pytest.raises(ConfigError, match="set data.packing=false"):
        validate_peft(cfg, rl_stage=False)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_virtual_tokens_are_rejected_in_rl_stages(method):
    with pytest.raises(ConfigError, match=f"method={method}.*cannot be merged.*stage=grpo"):
        validate(config("grpo", method=method))
    validate_peft(config("sft", method=method), rl_stage=False)  # offline: saved as base model + adapter


@pytest.mark.parametrize(
    "peft,lora_rank,message",
    [
        (dict(method="loha"), 0, "needs a rank: set model.lora.rank"),
        (dict(method="ia3"), 8, "model.lora.rank=8 turns LoRA on"),
        (dict(method="freeze"), 0, "needs model.peft.trainable_patterns"),
        (dict(method="freeze", frozen_patterns=["(unclosed"]), 0, "not a valid regex"),
        (dict(method="lora", frozen_layers=2), 8, "need model.peft.method=freeze or bitfit"),
        (dict(method="bitfit", trainable_patterns=["x"]), 0, "trainable_patterns needs model.peft.method=freeze"),
        (dict(method="adapterz"), 0, "is not one of none, lora"),
    ],
)
def test_inconsistent_settings_are_config_errors(peft, lora_rank, message):
    cfg = config(**peft)
    cfg.model.lora.rank = lora_rank
    with pytest.raises(ConfigError, match=message):
        validate_peft(cfg, rl_stage=False)


def test_patterns_that_freeze_everything_are_a_config_error():
    cfg = ModelConfig(peft=PeftConfig(method="freeze", trainable_patterns=["no_such_parameter"]))
    with pytest.raises(ConfigError, match="no parameter left trainable"):
        apply_peft(tiny(), cfg)


# -- merged export ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "lokr"])
def test_merged_export_equals_peft_merge_and_unload(method):
    model_cfg = EXPECTED[method][0]
    wrapped = apply_peft(tiny(), model_cfg)
    with torch.no_grad():  # move every adapter weight off its (often identity) initialisation
        gen = torch.Generator().manual_seed(1)
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    exported = dict(iter_full_parameters(wrapped, rank=0))
    reference = get_peft_model(tiny(), peft_config(method, model_cfg))
    reference.load_state_dict(wrapped.state_dict())
    merged = reference.merge_and_unload().state_dict()
    assert set(exported) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-6, msg=name)
    # the live adapter model is untouched: its forward still equals the merged weights'
    ids = torch.randint(1, VOCAB, (2, 6))
    plain = tiny()
    plain.load_state_dict(exported)
    torch.testing.assert_close(wrapped(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-5)


# -- models with a scalar head (reward model, critic) ------------------------------------------


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_scalar_head_models_take_only_mergeable_methods(method):
    if method in SCALAR_HEAD_PEFT_METHODS:
        check_scalar_head_peft(EXPECTED.get(method, (ModelConfig(),))[0], "critic")
        return
    model_cfg = ModelConfig(lora=LORA_QV, peft=PeftConfig(method=method))
    with pytest.raises(
        ConfigError, match=f"model.peft.method={method} cannot train the critic: allowed there are none, lora"
    ):
        check_scalar_head_peft(model_cfg, "critic")


def reward_model() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("qwen2", vocab_size=VOCAB)
    config.num_labels, config.pad_token_id = 1, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_reward_model_head_trains_and_exports_under_its_plain_name(method):
    wrapped = apply_peft(reward_model(), EXPECTED[method][0], task_type="SEQ_CLS", head="score")
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any(name.endswith(("score.weight", "score.modules_to_save.default.weight")) for name in trainable)
    with torch.no_grad():  # move the head and the method's parameters off their initialisation
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.1)
    exported = dict(iter_full_parameters(wrapped, rank=0))
    plain = reward_model()
    assert set(exported) == set(plain.state_dict())
    plain.load_state_dict(exported)
    ids = torch.randint(1, VOCAB, (2, 6))
    torch.testing.assert_close(wrapped(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_critic_backbone_adapters_export_under_the_backbone_names(tmp_path):
    from rlhf.models.value_model import ValueModel, hf_name

    tiny().save_pretrained(tmp_path)
    critic = ValueModel.from_pretrained(tmp_path)
    critic.backbone = apply_peft(critic.backbone, EXPECTED["lora"][0], task_type="FEATURE_EXTRACTION")
    assert {n for n, p in critic.named_parameters() if p.requires_grad} >= {"value_head.weight", "value_head.bias"}
    with torch.no_grad():
        for p in critic.parameters():
            if p.requires_grad:
                p.add_(0.1)
    exported = {hf_name(name): t for name, t in iter_full_parameters(critic, rank=0)}
    plain = ValueModel.from_pretrained(tmp_path)
    assert set(exported) == {hf_name(name) for name in plain.state_dict()}
    plain.load_state_dict({("" if n.startswith("value_head.") else "backbone.") + n: t for n, t in exported.items()})
    ids, mask = torch.randint(1, VOCAB, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    torch.testing.assert_close(critic(ids, mask), plain(ids, mask), rtol=0, atol=1e-5)
