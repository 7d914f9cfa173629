"""LoRA policy on 2 ranks under ZeRO-3: only adapters train; exported weights are merged, plain-named.

save_hf writes what the gather yields (the weight sync streams the same iterator); reloading it as a
plain model must reproduce the ranks' peft forward at 1e-5 (float32), which only holds if every
adapter was merged (W + scale·B·A) into the right base weight. The exact equality with peft's
merge_and_unload is checked single-process in tests/unit/workers/test_train_engine.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.config import AlgorithmConfig, ClusterConfig, LoraConfig, ModelConfig, OptimConfig, RLHFConfig, TrainConfig
from rlhf.models.logprobs import response_logprobs
from rlhf.trainers.roles import start_policy_group
from rlhf.workers.group import WorkerGroup
from rlhf.workers.policy import PolicyWorker

pytestmark = pytest.mark.ray


def start_lora_policy(model_path: str) -> tuple[WorkerGroup, dict[str, int]]:
    model_cfg = ModelConfig(
        lora=LoraConfig(rank=4, alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]), gradient_checkpointing=True
    )
    train_cfg = TrainConfig(
        num_workers=2,
        zero_stage=3,
        zero3_param_persistence_threshold=0,
        micro_batch_size=2,
        train_batch_size=8,
        optim=OptimConfig(lr=1e-2),
    )
    cfg = RLHFConfig(
        model=model_cfg,
        policy=train_cfg,
        algorithm=AlgorithmConfig(kl_coef=0.0),
        cluster=ClusterConfig(collective_timeout_s=120),
    )
    group = start_policy_group(cfg, PolicyWorker, role="policy-lora", algo_cfg=cfg.algorithm)
    return group, group.call(PolicyWorker.init_model, model_path, timeout=300)


@pytest.fixture(scope="module")
def lora_policy(ray_session, tiny_model_path):
    group, counts = start_lora_policy(tiny_model_path)
    yield group, counts
    group.shutdown()


def test_lora_trains_adapters_and_exports_merged_plain_weights(lora_policy, tiny_model_path, tmp_path, batch_factory):
    group, counts = lora_policy
    assert 0 < counts["num_trainable_parameters"] < counts["num_parameters"] / 10
    batch = batch_factory(rows=8, seed=3)
    old = group.call(PolicyWorker.compute_logprobs, batch)
    batch = batch.replace(old_logprobs=old, advantages=torch.ones_like(old))
    for _ in range(2):
        stats = group.call(PolicyWorker.update, batch)
    assert stats["policy/grad_norm"] > 0

    out = tmp_path / "merged"
    group.call(PolicyWorker.save_hf, str(out))
    merged, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    names = [n for n, _ in merged.named_parameters()]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not [n for n in names if "lora" in n or "base_layer" in n]

    mask = batch.response_mask.bool()
    trained = group.call(PolicyWorker.compute_logprobs, batch)
    exported, _ = response_logprobs(merged.eval(), batch)
    torch.testing.assert_close(exported[mask], trained[mask], rtol=0, atol=1e-5)
    base, _ = response_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), batch)
    assert (trained[mask] - base[mask]).abs().max() > 1e-3  # the adapters changed the model


def test_lora_checkpoint_holds_the_adapters(lora_policy, tmp_path, batch_factory):
    # frozen base weights are left out of the DeepSpeed checkpoint (init_model loads them from the
    # base checkpoint); loading must bring back the adapters and their optimizer state
    group, _ = lora_policy
    batch = batch_factory(rows=8, seed=8)
    old = group.call(PolicyWorker.compute_logprobs, batch)
    batch = batch.replace(old_logprobs=old, advantages=torch.ones_like(old))
    group.call(PolicyWorker.update, batch)
    group.call(PolicyWorker.save_checkpoint, str(tmp_path / "ckpt"))
    saved = group.call(PolicyWorker.compute_logprobs, batch)
    group.call(PolicyWorker.update, batch)
    after_step = group.call(PolicyWorker.compute_logprobs, batch)
    assert (after_step - saved).abs().max() > 1e-3

    group.call(PolicyWorker.load_checkpoint, str(tmp_path / "ckpt"))
    torch.testing.assert_close(group.call(PolicyWorker.compute_logprobs, batch), saved, rtol=0, atol=1e-6)
    group.call(PolicyWorker.update, batch)
    torch.testing.assert_close(group.call(PolicyWorker.compute_logprobs, batch), after_step, rtol=0, atol=1e-5)
